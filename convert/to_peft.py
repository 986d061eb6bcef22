"""GGUF LoRA adapter(s) -> one Hugging Face PEFT LoRA folder: the inverse of converter.py.

llama.cpp adds ``scale * alpha / r * B @ A`` per adapter file to a base tensor. A weighted sum of
LoRAs is itself a LoRA of the summed rank: stack the A rows, stack the scaled B columns. So a
stack of adapters (``pirate:0.7 + terse:0.3``) becomes one exact PEFT LoRA, which engines that
apply one adapter per request (vLLM) can serve.

The folder written has one rank R for every module (zero rows/columns pad the smaller ones) and
``lora_alpha = R``, so PEFT's scaling is exactly 1 and every factor lives in ``lora_B``: no
rank_pattern/alpha_pattern/rsLoRA for a consumer to get wrong. The inverse transforms: GGUF
tensor names -> HF module names, the llama q/k RoPE row permutation undone, the embedding's
``lora_a`` transposed back to ``lora_embedding_A``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

from .converter import ROPE_PERMUTED, read_base
from .errors import ConvertError
from .gguf_header import GGUFHeader
from .peft_source import CONFIG, WEIGHTS, _natural

EMBEDDING = "token_embd.weight"
# HF module names of the models llama.cpp applies LoRA to (llama, gemma, qwen, mistral...):
# their GGUF names come from gguf-py's own TensorNameMap, so the mapping is its exact inverse.
_BLOCK_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_GLOBAL_MODULES = ("model.embed_tokens", "lm_head")


@dataclass
class GgufLora:
    path: Path
    architecture: str
    alpha: float | None
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]  # base tensor -> (lora_a, lora_b), numpy shapes as stored
    metadata: dict[str, object] = field(default_factory=dict)

    def factor(self, target: str, scale: float) -> float:
        """What llama.cpp multiplies B @ A by for ``target`` at user scale ``scale``."""
        rank = self.tensors[target][1].shape[1]
        return scale * (self.alpha / rank if self.alpha is not None else 1.0)


def read_gguf_lora(path: str | Path) -> GgufLora:
    """Every lora_a/lora_b pair of a GGUF adapter, de-quantized to f32."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{path}: not a readable GGUF file ({exc})") from None

    def value(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    if value("general.type") != "adapter" or value("adapter.type") != "lora":
        raise ConvertError(f"{path}: not a GGUF LoRA adapter (general.type={value('general.type')!r})")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        stem, _, kind = t.name.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            raise ConvertError(f"{path}: tensor {t.name} is not a lora_a/lora_b tensor")
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        pairs.setdefault(stem, {})[kind] = arr.reshape([int(n) for n in reversed(t.shape)])
    tensors = {}
    for stem, kinds in pairs.items():
        if set(kinds) != {"lora_a", "lora_b"}:
            raise ConvertError(f"{path}: {stem} has {', '.join(sorted(kinds))} but not its pair")
        tensors[stem] = (kinds["lora_a"], kinds["lora_b"])
    meta = {k: value(k) for k in reader.fields if k.startswith(("general.", "edgelora."))}
    alpha = value("adapter.lora.alpha")
    return GgufLora(path, str(value("general.architecture")), None if not alpha else float(alpha), tensors, meta)


def hf_module_names(architecture: str, n_blocks: int) -> dict[str, str]:
    """GGUF base tensor name -> HF module name, through gguf-py's TensorNameMap."""
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch_enum is None:
        raise ConvertError(f"architecture {architecture!r} is unknown to the installed gguf package")
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    out: dict[str, str] = {}
    candidates = [*(f"model.layers.{i}.{m}" for i in range(n_blocks) for m in _BLOCK_MODULES), *_GLOBAL_MODULES]
    for module in candidates:
        found = names.get_name(module)
        if found is not None:
            out.setdefault(found + ".weight", module)
    return out


def unpermute(rows: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute on lora_b's output rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass
class PeftModule:
    module: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    embedding: bool
    a: np.ndarray  # PEFT orientation: (r, n_in); embedding: lora_embedding_A (r, vocab)
    b: np.ndarray  # (n_out, r); embedding: lora_embedding_B (dim, r); every factor folded in


@dataclass
class PeftExport:
    rank: int
    modules: list[PeftModule]

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.module.rsplit(".", 1)[-1] for m in self.modules})


def plan_peft(adapters: list[tuple[str | Path, float]], base: str | Path | GGUFHeader) -> PeftExport:
    """The weighted sum of GGUF LoRA ``adapters`` (path, user scale) on ``base`` as one PEFT LoRA."""
    header = base if isinstance(base, GGUFHeader) else read_base(base)
    arch = header.architecture
    n_blocks = int(header.get(f"{arch}.block_count", 0))
    hf_names = hf_module_names(arch, n_blocks)
    stacked: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for path, scale in adapters:
        lora = read_gguf_lora(path)
        if lora.architecture != arch:
            raise ConvertError(f"{path}: adapter is for {lora.architecture}, the base {header.path.name} is {arch}")
        if scale == 0:
            continue
        for target, (a, b) in lora.tensors.items():
            if target not in hf_names:
                raise ConvertError(f"{path}: {target} has no Hugging Face module this exporter knows "
                                   f"(it maps attention, MLP, embedding and lm_head tensors)")
            if target not in header.tensors:
                raise ConvertError(f"{path}: {target} is not a tensor of the base {header.path.name}")
            a, b = _to_peft_orientation(target, a, b, header, arch)
            stacked.setdefault(target, []).append((a, b * np.float32(lora.factor(target, scale))))
    if not stacked:
        raise ConvertError("nothing to export: no adapter with a non-zero scale")
    rank = max(sum(a.shape[0] for a, _ in parts) for parts in stacked.values())
    modules = []
    for target in sorted(stacked, key=lambda t: _natural(hf_names[t])):
        a = np.concatenate([a for a, _ in stacked[target]], axis=0)
        b = np.concatenate([b for _, b in stacked[target]], axis=1)
        pad = rank - a.shape[0]
        if pad:  # zero rows of A meet zero columns of B: the product is unchanged
            a = np.concatenate([a, np.zeros((pad, a.shape[1]), np.float32)], axis=0)
            b = np.concatenate([b, np.zeros((b.shape[0], pad), np.float32)], axis=1)
        modules.append(PeftModule(hf_names[target], target == EMBEDDING, a, b))
    return PeftExport(rank, modules)


def _to_peft_orientation(target, a, b, header: GGUFHeader, arch: str) -> tuple[np.ndarray, np.ndarray]:
    """GGUF numpy shapes -> PEFT's, checked against the base tensor's shape."""
    ne = header.tensors[target].ne
    if target == EMBEDDING:  # lora_a is (vocab, r) for llama.cpp's get_rows; PEFT's is (r, vocab)
        a = np.ascontiguousarray(a.T)
        n_in, n_out = ne[1], ne[0]
    else:
        n_in, n_out = ne[0], ne[1]
    if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
        raise ConvertError(f"{target}: lora_a {list(a.shape)} / lora_b {list(b.shape)} do not fit the base's "
                           f"{n_in} -> {n_out}")
    if arch in ROPE_PERMUTED and target.endswith(("attn_q.weight", "attn_k.weight")):
        n_head = int(header.get(f"{arch}.attention.head_count"))
        n_head_kv = int(header.get(f"{arch}.attention.head_count_kv", n_head))
        b = unpermute(b, n_head, n_head_kv if target.endswith("attn_k.weight") else n_head)
    return a, b


def peft_config(export: PeftExport, base_model_name_or_path: str = "") -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": export.rank,
        "lora_alpha": export.rank,  # scaling = 1: every factor is already in lora_B
        "target_modules": export.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }


def peft_tensors(export: PeftExport, dtype=np.float32) -> dict[str, np.ndarray]:
    out = {}
    for m in export.modules:
        key = f"base_model.model.{m.module}"
        if m.embedding:  # PEFT saves embedding LoRAs without '.weight'
            out[f"{key}.lora_embedding_A"] = m.a.astype(dtype)
            out[f"{key}.lora_embedding_B"] = m.b.astype(dtype)
        else:
            out[f"{key}.lora_A.weight"] = m.a.astype(dtype)
            out[f"{key}.lora_B.weight"] = m.b.astype(dtype)
    return out


def check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or an earlier PEFT adapter folder may be replaced."""
    if out_dir.is_symlink() or (out_dir.exists() and not (out_dir / CONFIG).is_file()):
        if out_dir.is_symlink() or not out_dir.is_dir() or any(out_dir.iterdir()):
            raise ConvertError(f"{out_dir} exists and is not a PEFT adapter folder; refusing to replace it")


def write_peft(export: PeftExport, out_dir: str | Path, *, base_model_name_or_path: str = "",
               metadata: dict[str, str] | None = None) -> Path:
    """Write the folder atomically: a temp folder beside it, renamed into place (an old one replaced)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(out_dir)
    for m in export.modules:
        if not (np.isfinite(m.a).all() and np.isfinite(m.b).all()):
            raise ConvertError(f"{m.module}: NaN or Inf in the exported weights")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        (tmp / CONFIG).write_text(json.dumps(peft_config(export, base_model_name_or_path), indent=2) + "\n")
        save_file(peft_tensors(export), str(tmp / WEIGHTS), metadata={"format": "pt", **(metadata or {})})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, out_dir)
    return out_dir


def replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder ``tmp`` to ``out_dir``, replacing an earlier one."""
    try:
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the folder is an ordinary one
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_peft(adapters: list[tuple[str | Path, float]], base: str | Path, out_dir: str | Path, *,
                base_model_name_or_path: str = "") -> PeftExport:
    """GGUF LoRA adapter(s) with scales -> one PEFT LoRA folder computing their sum on ``base``."""
    export = plan_peft(adapters, base)
    write_peft(export, out_dir, base_model_name_or_path=base_model_name_or_path)
    return export
