"""Read GGUF metadata and tensor shapes (gguf package) and validate a LoRA adapter against a base.

Shapes are given in GGUF order (ne): a weight with ne ``[n_in, n_out]``; an adapter's
``.lora_a`` has ne ``[n_in, r]`` and ``.lora_b`` ne ``[r, n_out]``. llama.cpp checks the same
things but only says NULL; we check first so the user reads the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from edgelora.convert.gguf_header import GGUFHeaderError, read_header
from edgelora.errors import (
    ArchitectureMismatchError,
    NonFiniteError,
    NotGGUFError,
    NotLoraAdapterError,
    ShapeMismatchError,
    TensorMismatchError,
)

LORA_A, LORA_B = ".lora_a", ".lora_b"


@dataclass
class GGUFInfo:
    path: Path
    metadata: dict[str, object]
    tensors: dict[str, tuple[int, ...]]  # name -> ne (GGUF order)
    size: int
    types: dict = field(default_factory=dict)  # key -> GGUFValueType

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")  # type: ignore[return-value]

    @property
    def name(self) -> str | None:
        return self.metadata.get("general.name")  # type: ignore[return-value]


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise NotGGUFError(f"{path}: no such file")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise NotGGUFError(f"{path} is not a readable GGUF file ({exc})") from None


def read_gguf(path: str | Path) -> GGUFInfo:
    """Metadata (arrays longer than 64 items skipped, e.g. vocabularies) and tensor shapes; milliseconds."""
    path = Path(path)
    if not path.is_file():
        raise NotGGUFError(f"{path}: no such file")
    try:
        header = read_header(path)
    except GGUFHeaderError as exc:
        raise NotGGUFError(str(exc)) from None
    tensors = {name: t.ne for name, t in header.tensors.items()}
    return GGUFInfo(path=path, metadata=header.metadata, tensors=tensors, size=path.stat().st_size,
                    types=header.types or {})


# Keys llama.cpp reads from an adapter with a typed getter: a value of another type aborts the
# process (gguf.cpp: GGML_ASSERT(type_to_gguf_type<T>::value == type)).
ADAPTER_KEY_TYPES = {
    "general.architecture": GGUFValueType.STRING,
    "general.type": GGUFValueType.STRING,
    "general.alignment": GGUFValueType.UINT32,
    "adapter.type": GGUFValueType.STRING,
    "adapter.lora.alpha": GGUFValueType.FLOAT32,
    "adapter.lora.task_name": GGUFValueType.STRING,
    "adapter.lora.prompt_prefix": GGUFValueType.STRING,
}
MAX_ALPHA = 1e5  # PEFT alphas are tens to hundreds; 1e30 or Inf turns every output into NaN


def check_key_types(info: GGUFInfo, expected: dict) -> None:
    for key, vtype in expected.items():
        got = info.types.get(key)
        if got is not None and got != vtype:
            raise NotGGUFError(f"{info.path}: {key} is {got.name.lower()}, llama.cpp needs {vtype.name.lower()}")


def validate_base_model(info: GGUFInfo) -> None:
    """The hyperparameters llama.cpp asserts on (or silently mis-uses) when it loads a base model."""
    from edgelora.errors import ModelError

    path, meta = info.path, info.metadata
    arch = meta.get("general.architecture")
    if info.types.get("general.architecture") != GGUFValueType.STRING or not arch:
        raise ModelError(f"{path}: general.architecture is missing or not a string")
    if info.types.get("general.alignment", GGUFValueType.UINT32) != GGUFValueType.UINT32:
        raise ModelError(f"{path}: general.alignment must be uint32")

    def number(key: str, lo: float, hi: float, *, required: bool = False, integer: bool = False, strict_lo=False):
        value = meta.get(key)
        if value is None:
            if required:
                raise ModelError(f"{path}: {key} is missing")
            return
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not np.isfinite(value) or not lo <= value <= hi or (strict_lo and value == lo):
            bound = f"greater than {lo:g}" if strict_lo else f"from {lo:g}"
            raise ModelError(f"{path}: {key} is {value!r}; it must be {'an integer' if integer else 'a number'} {bound} to {hi:g}")

    number(f"{arch}.block_count", 1, 4096, required=True, integer=True)
    number(f"{arch}.context_length", 1, 1 << 24, integer=True)
    number(f"{arch}.embedding_length", 1, 1 << 20, integer=True)
    number(f"{arch}.attention.head_count", 1, 1 << 16, integer=True)
    number(f"{arch}.attention.head_count_kv", 1, 1 << 16, integer=True)
    number(f"{arch}.attention.layer_norm_rms_epsilon", 0, 1)
    number(f"{arch}.attention.layer_norm_epsilon", 0, 1)
    number(f"{arch}.rope.freq_base", 0, 1e12, strict_lo=True)
    number(f"{arch}.rope.scale_linear", 0, 1e6, strict_lo=True)


def validate_adapter(path: str | Path, base: GGUFInfo, *, check_values: bool = True) -> GGUFInfo:
    """Check that ``path`` is a LoRA adapter llama.cpp can apply to ``base``; raise a typed error if not."""
    path = Path(path)
    info = read_gguf(path)
    meta = info.metadata
    check_key_types(info, ADAPTER_KEY_TYPES)
    alpha = meta.get("adapter.lora.alpha")
    if alpha is not None and (not np.isfinite(alpha) or abs(alpha) > MAX_ALPHA):
        raise NonFiniteError(f"{path}: adapter.lora.alpha is {alpha}; it must be finite and at most {MAX_ALPHA:g}")
    gtype = meta.get("general.type")
    if gtype != "adapter":
        raise NotLoraAdapterError(f"{path} is not an adapter: general.type is {gtype!r}, expected 'adapter'")
    atype = meta.get("adapter.type")
    if atype != "lora":
        raise NotLoraAdapterError(f"{path} is not a LoRA adapter: adapter.type is {atype!r}, expected 'lora'")
    arch = info.architecture
    if arch != base.architecture:
        raise ArchitectureMismatchError(f"{path} was made for {arch}; the loaded base is {base.architecture}")

    pairs: dict[str, list] = {}
    for name, ne in info.tensors.items():
        if name.endswith(LORA_A):
            pairs.setdefault(name[: -len(LORA_A)], [None, None])[0] = ne
        elif name.endswith(LORA_B):
            pairs.setdefault(name[: -len(LORA_B)], [None, None])[1] = ne
        else:
            raise TensorMismatchError(f"{path}: tensor {name} is neither a .lora_a nor a .lora_b tensor")
    if not pairs:
        raise TensorMismatchError(f"{path} holds no LoRA tensors")
    for target, (a, b) in sorted(pairs.items()):
        if a is None or b is None:
            missing = LORA_A if a is None else LORA_B
            raise TensorMismatchError(f"{path}: {target}{missing} is missing (its pair is present)")
        if target not in base.tensors:
            raise TensorMismatchError(f"{path}: {target} is not a tensor of the base model {base.path.name}")
        w = base.tensors[target]
        if len(w) != 2:
            raise ShapeMismatchError(f"{path}: {target} is a {len(w)}-D tensor of the base; LoRA applies to 2-D weights")
        if len(a) != 2 or len(b) != 2:
            raise ShapeMismatchError(f"{path}: {target} lora tensors must be 2-D, got {list(a)} and {list(b)}")
        if target == "token_embd.weight":
            if "output.weight" not in base.tensors:
                # the base's output IS token_embd: llama.cpp would apply this LoRA there too and abort
                raise TensorMismatchError(
                    f"{path} adapts token_embd.weight, but {base.path.name} ties its output to token_embd; "
                    "llama.cpp cannot apply an embedding LoRA to a tied base"
                )
            # llama.cpp picks lora_a rows by token id: lora_a ne [r, n_vocab], lora_b ne [r, n_embd]
            if a[0] != b[0]:
                raise ShapeMismatchError(f"{path}: {target}.lora_a has rank {a[0]} but {target}.lora_b has rank {b[0]}")
            if a[1] != w[1] or b[1] != w[0]:
                raise ShapeMismatchError(
                    f"{path}: {target} LoRA is for vocab {a[1]} x dim {b[1]}; the base has vocab {w[1]} x dim {w[0]}"
                )
            continue
        if a[1] != b[0]:
            raise ShapeMismatchError(
                f"{path}: {target}.lora_a has rank {a[1]} but {target}.lora_b has rank {b[0]}"
            )
        if a[0] != w[0]:
            raise ShapeMismatchError(
                f"{path}: {target}.lora_a has {a[0]} columns, the base tensor has {w[0]}"
            )
        if b[1] != w[1]:
            raise ShapeMismatchError(f"{path}: {target}.lora_b has {b[1]} rows, the base tensor has {w[1]}")

    header = read_header(path)
    for t in header.tensors.values():
        block, type_size = GGML_QUANT_SIZES[t.type]
        need = header.data_offset + t.offset + int(np.prod(t.ne)) // block * type_size
        if need > header.size:
            raise NotGGUFError(f"{path} is truncated or corrupted: tensor {t.name} needs {need} bytes, "
                               f"the file has {header.size}")
    if check_values:
        for t in _open(path).tensors:
            try:
                values = dequantize(t.data, t.tensor_type)
            except Exception as exc:
                raise NotGGUFError(f"{path}: tensor {t.name} cannot be read ({exc})") from None
            if values.size != int(np.prod(t.shape)):
                raise NotGGUFError(f"{path}: tensor {t.name} is truncated")
            if not np.isfinite(values).all():
                raise NonFiniteError(f"{path}: tensor {t.name} holds NaN or Inf values")

    return info
