"""PEFT LoRA -> GGUF LoRA adapter, faithful to what PEFT computes.

For each adapted module PEFT adds ``scaling_m * B_m @ A_m`` to the weight, with
``scaling_m = alpha_m / r_m`` (or ``alpha_m / sqrt(r_m)`` with rsLoRA) and per-module rank and
alpha from ``rank_pattern``/``alpha_pattern``. llama.cpp adds ``user_scale * alpha / r_m * B @ A``
with one ``alpha`` per file. So we write ``alpha = scaling_default * r_default`` and fold
``scaling_m * r_m / alpha`` into ``lora_b`` wherever a module differs from the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from . import __version__
from .errors import ConvertError
from .gguf_header import GGUFHeader, GGUFHeaderError, read_header
from .outputs import atomic_output, check_target
from .peft_source import LoraModule, PeftSource, read_peft, sha256_file

# Architectures whose HF -> GGUF conversion permutes q/k rows for llama.cpp's RoPE layout
# (convert_hf_to_gguf.py's LlamaModel.permute). Qwen2/3, Gemma and Phi-3 are not permuted.
ROPE_PERMUTED = {"llama"}

OUTTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}

# Prefixes other model classes put before the decoder ("model.layers..."): multimodal wrappers.
_PREFIX_ALIASES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))


@dataclass
class PlannedTensor:
    source: str  # PEFT module name
    target: str  # GGUF base tensor name
    a_shape: tuple[int, ...]  # numpy shapes as written
    b_shape: tuple[int, ...]
    rank: int
    peft_scaling: float
    fold: float  # factor folded into lora_b
    permuted: bool
    a_type: str = ""
    b_type: str = ""


@dataclass
class ConversionPlan:
    source: PeftSource
    base: GGUFHeader
    base_sha256: str
    alpha: float
    outtype: str
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)
    _arrays: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    @property
    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(lora_a, lora_b) of each planned tensor, as they will be written."""
        return self._arrays

    def describe(self) -> str:
        lines = [
            f"source: {self.source.path} (base_model_name_or_path: {self.source.base_model or '?'})",
            f"base:   {self.base.path} ({self.base.architecture}, sha256 {self.base_sha256[:16]}…)",
            f"alpha:  {self.alpha:g} (file-wide); rslora: {self.source.use_rslora}; outtype: {self.outtype}",
            f"{'PEFT module':<48} {'GGUF tensor':<28} {'lora_a':>14} {'lora_b':>14}  rank  scale   fold",
        ]
        for t in self.tensors:
            flag = " (q/k permuted)" if t.permuted else ""
            lines.append(
                f"{t.source:<48} {t.target:<28} {str(list(t.a_shape)):>14} {str(list(t.b_shape)):>14}"
                f"  {t.rank:>4}  {t.peft_scaling:<6.4g}  {t.fold:<6.4g}{flag}"
            )
        return "\n".join(lines)


def plan_conversion(
    peft_dir: str | Path,
    base: str | Path,
    *,
    outtype: str = "f16",
    name: str | None = None,
    base_sha256: str | None = None,
) -> ConversionPlan:
    """Read, check and lay out the conversion; nothing is written."""
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    source = read_peft(peft_dir)
    header = read_base(base)
    arch = header.architecture
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise ConvertError(f"{base}: architecture {arch!r} is unknown to the installed gguf package")
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    n_blocks = int(header.get(f"{arch}.block_count", 0))
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)

    r0, _, s0 = source.default_scaling()
    alpha = s0 * r0
    plan = ConversionPlan(
        source=source,
        base=header,
        base_sha256=base_sha256 or sha256_file(header.path),
        alpha=alpha,
        outtype=outtype,
        name=name or Path(peft_dir).resolve().name,
    )
    for m in source.modules:
        target = _gguf_name(m.module, names)
        if target is None:
            raise ConvertError(
                f"{source.path}: target module {m.module} has no counterpart in a GGUF {arch} model "
                "(convert only modules llama.cpp applies LoRA to: attention, MLP, embeddings, lm_head)"
            )
        if target not in header.tensors:
            if target == "output.weight":
                raise ConvertError(
                    f"{source.path}: {m.module} adapts lm_head, but {Path(base).name} ties its output to "
                    "token_embd (there is no output.weight); llama.cpp cannot apply it. Retrain without lm_head in target_modules"
                )
            raise ConvertError(f"{source.path}: {m.module} maps to {target}, which {Path(base).name} does not have")
        if m.embedding and "output.weight" not in header.tensors:
            raise ConvertError(
                f"{source.path}: {m.module} adapts the token embeddings, but {Path(base).name} ties its output "
                "projection to token_embd; llama.cpp would apply this LoRA to the output too (and abort). "
                "Retrain without embed_tokens in target_modules, or use a base with a separate output.weight"
            )
        a, b, permuted = _orient(m, target, header, arch)
        fold = m.scaling * m.rank / alpha
        if fold != 1.0:
            b = b * np.float32(fold)
        plan.tensors.append(PlannedTensor(m.module, target, a.shape, b.shape, m.rank, m.scaling, fold, permuted))
        plan._arrays.append((a, b))
    return plan


def read_base(base) -> GGUFHeader:
    """The base model's GGUF header; an adapter given as the base is refused."""
    try:
        header = read_header(base)
    except GGUFHeaderError as exc:
        raise ConvertError(f"base {exc}") from None
    if header.get("general.type") == "adapter":
        raise ConvertError(f"{base} is an adapter; --base needs the base model GGUF")
    return header


def _gguf_name(module: str, names: gguf.TensorNameMap) -> str | None:
    candidates = [module] + [new + module[len(old):] for old, new in _PREFIX_ALIASES if module.startswith(old)]
    for key in candidates:
        found = names.get_name(key)
        if found is not None:
            return found + ".weight"
    return None


def _orient(m: LoraModule, target: str, header: GGUFHeader, arch: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """PEFT arrays -> the arrays llama.cpp expects (numpy shapes; GGUF ne is reversed), shape-checked."""
    ne = header.tensors[target].ne
    a, b = m.a.astype(np.float32, copy=False), m.b.astype(np.float32, copy=False)
    if m.embedding:
        # llama.cpp get_rows() on lora_a by token id: lora_a is (vocab, r), lora_b (dim, r)
        dim, vocab = ne
        if a.shape[1] != vocab or b.shape[0] != dim:
            raise ConvertError(
                f"{m.module}: embedding LoRA is for vocab {a.shape[1]} x dim {b.shape[0]}; the base's {target} "
                f"is vocab {vocab} x dim {dim} (shapes do not fit the base)"
            )
        return np.ascontiguousarray(a.T), b, False
    n_in, n_out = ne[0], ne[1]
    if a.shape[1] != n_in or b.shape[0] != n_out:
        raise ConvertError(
            f"{m.module}: LoRA maps {a.shape[1]} -> {b.shape[0]} features; the base's {target} maps "
            f"{n_in} -> {n_out} (shapes do not fit the base)"
        )
    permuted = False
    if arch in ROPE_PERMUTED and target.endswith(("attn_q.weight", "attn_k.weight")):
        n_head = int(header.get(f"{arch}.attention.head_count"))
        n_head_kv = int(header.get(f"{arch}.attention.head_count_kv", n_head))
        b = _permute(b, n_head, n_head_kv if target.endswith("attn_k.weight") else n_head)
        permuted = True
    return a, b, permuted


def _permute(rows: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, applied to lora_b's output rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def check_output(plan: ConversionPlan, out: Path, *, force: bool = False) -> None:
    """Refuse outputs that would destroy something: the base, the PEFT sources, anything that is not
    a regular file, and (without ``force``) an existing file that is not a GGUF LoRA adapter."""
    if os.path.isdir(out):
        raise ConvertError(f"-o {out} is a folder; give a file name, e.g. {out / (plan.name + '.gguf')}")
    check_target(out, "-o", is_ours=_is_lora_gguf, ours="a GGUF LoRA adapter", force=force,
                 protected=[(plan.base.path, "the base model"),
                            (plan.source.path, f"inside the PEFT folder {plan.source.path}")])


F16_MAX = float(np.finfo(np.float16).max)


def check_values(plan: ConversionPlan) -> None:
    """Refuse to write NaN/Inf, or values the output type cannot hold (f16 overflows to Inf)."""
    for t, (a, b) in zip(plan.tensors, plan._arrays):
        for which, arr in (("lora_a", a), ("lora_b", b)):
            if not np.isfinite(arr).all():
                raise ConvertError(f"{t.target}.{which}: NaN or Inf after scaling (check lora_alpha and the weights)")
            peak = float(np.abs(arr).max()) if arr.size else 0.0
            if plan.outtype in ("f16", "q8_0") and peak > F16_MAX:
                raise ConvertError(f"{t.target}.{which}: values up to {peak:.3g} overflow {plan.outtype} "
                                   f"(max {F16_MAX:g}); use --outtype f32 or bf16")


def _is_lora_gguf(path: Path) -> bool:
    try:
        from .gguf_header import read_header

        return read_header(path).get("general.type") == "adapter"
    except (ValueError, OSError):
        return False


def write_plan(plan: ConversionPlan, out: str | Path, *, progress: bool = False, force: bool = False) -> Path:
    """Write atomically: a temp file in the destination folder, renamed over ``out`` at the end."""
    out = Path(out)
    check_output(plan, out, force=force)
    check_values(plan)
    qtype = OUTTYPES[plan.outtype]
    with atomic_output(out, "-o") as tmp:
        writer = gguf.GGUFWriter(tmp, plan.base.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan.alpha))
        writer.add_name(plan.name)
        src = plan.source
        writer.add_string("edgelora.source.base_model_name_or_path", src.base_model)
        writer.add_string("edgelora.source.config_sha256", src.config_sha256)
        writer.add_string("edgelora.source.weights_sha256", src.weights_sha256)
        writer.add_bool("edgelora.source.use_rslora", src.use_rslora)
        writer.add_string("edgelora.base.sha256", plan.base_sha256)
        writer.add_string("edgelora.base.file", plan.base.path.name)
        writer.add_string("edgelora.base.name", str(plan.base.get("general.name", "")))
        writer.add_string("edgelora.converter", f"edgelora.convert {__version__}")
        for t, (a, b) in zip(plan.tensors, plan._arrays):
            t.a_type = _add(writer, t.target + ".lora_a", a, qtype)
            t.b_type = _add(writer, t.target + ".lora_b", b, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return out


def _add(writer: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: gguf.GGMLQuantizationType) -> str:
    """Add one tensor in ``qtype``; q8_0 needs rows that are a multiple of 32, else f16 is used."""
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        return "f32"
    if qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, arr.astype(np.float16))
        return "f16"
    try:
        data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
    except gguf.quants.QuantError:
        writer.add_tensor(name, arr.astype(np.float16))
        return "f16"
    writer.add_tensor(name, data, raw_dtype=qtype)
    return qtype.name.lower()


def convert_peft(
    peft_dir: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    outtype: str = "f16",
    name: str | None = None,
    base_sha256: str | None = None,
    progress: bool = False,
    force: bool = False,
) -> ConversionPlan:
    """Convert a PEFT LoRA folder into a GGUF LoRA adapter for ``base``. Returns the plan written."""
    plan = plan_conversion(peft_dir, base, outtype=outtype, name=name, base_sha256=base_sha256)
    write_plan(plan, out, progress=progress, force=force)
    return plan
