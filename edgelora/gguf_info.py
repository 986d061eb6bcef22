"""Read GGUF metadata and tensor shapes (gguf package) and validate a LoRA adapter against a base.

Shapes are given in GGUF order (ne): a weight with ne ``[n_in, n_out]``; an adapter's
``.lora_a`` has ne ``[n_in, r]`` and ``.lora_b`` ne ``[r, n_out]``. llama.cpp checks the same
things but only says NULL; we check first so the user reads the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import platformdirs
from gguf import GGUFReader
from gguf.quants import dequantize

from .errors import (
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

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")  # type: ignore[return-value]

    @property
    def name(self) -> str | None:
        return self.metadata.get("general.name")  # type: ignore[return-value]


@dataclass
class AdapterInfo(GGUFInfo):
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def alpha(self) -> float | None:
        a = self.metadata.get("adapter.lora.alpha")
        return float(a) if a is not None else None  # type: ignore[arg-type]

    @property
    def ranks(self) -> set[int]:
        return {b_ne[0] for _, b_ne in self.pairs.values()}


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise NotGGUFError(f"{path}: no such file")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise NotGGUFError(f"{path} is not a readable GGUF file ({exc})") from None


def _field_value(f) -> object:
    try:
        return f.contents()
    except Exception:
        return None


def read_gguf(path: str | Path) -> GGUFInfo:
    """Metadata (arrays longer than 64 items skipped, e.g. vocabularies) and tensor shapes."""
    path = Path(path)
    return _info(path, _open(path))


def _info(path: Path, reader: GGUFReader) -> GGUFInfo:
    meta: dict[str, object] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or len(f.data) > 64:
            continue
        meta[key] = _field_value(f)
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    return GGUFInfo(path=path, metadata=meta, tensors=tensors, size=path.stat().st_size)


def read_gguf_cached(path: str | Path) -> GGUFInfo:
    """read_gguf for big base models: parsing a 50k-token vocabulary takes seconds, so the
    result is kept as JSON in the user cache folder, keyed by path, size and mtime."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = Path(platformdirs.user_cache_dir("edgelora")) / "gguf-info" / f"{key}.json"
    try:
        data = json.loads(cache.read_text("utf-8"))
        return GGUFInfo(path, data["metadata"], {k: tuple(v) for k, v in data["tensors"].items()}, data["size"])
    except (OSError, ValueError, KeyError):
        pass
    info = read_gguf(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = {"metadata": info.metadata, "tensors": info.tensors, "size": info.size}
        atomic_write_text(cache, json.dumps(data, default=_jsonable))
    except OSError:
        pass  # a read-only cache folder only costs time
    return info


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def validate_adapter(path: str | Path, base: GGUFInfo, *, check_values: bool = True) -> AdapterInfo:
    """Check that ``path`` is a LoRA adapter llama.cpp can apply to ``base``; raise a typed error if not."""
    path = Path(path)
    reader = _open(path)
    info = _info(path, reader)
    meta = info.metadata
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
        if len(a) != 2 or len(b) != 2:
            raise ShapeMismatchError(f"{path}: {target} lora tensors must be 2-D, got {list(a)} and {list(b)}")
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

    if check_values:
        for t in reader.tensors:
            try:
                values = dequantize(t.data, t.tensor_type)
            except Exception as exc:
                raise NotGGUFError(f"{path}: tensor {t.name} cannot be read ({exc})") from None
            if values.size != int(np.prod(t.shape)):
                raise NotGGUFError(f"{path}: tensor {t.name} is truncated")
            if not np.isfinite(values).all():
                raise NonFiniteError(f"{path}: tensor {t.name} holds NaN or Inf values")

    return AdapterInfo(
        path=path,
        metadata=meta,
        tensors=info.tensors,
        size=info.size,
        pairs={k: (tuple(a), tuple(b)) for k, (a, b) in pairs.items()},
    )
