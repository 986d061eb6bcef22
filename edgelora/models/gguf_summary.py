"""`edgelora inspect` in words: what a GGUF is, in a dozen lines instead of every key and tensor."""

from __future__ import annotations

import math
import re

from edgelora.models.gguf_info import LORA_A, LORA_B, GGUFInfo

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


def _targets(names) -> tuple[list[str], list[int]]:
    """Weight names -> (modules, layers): 'blk.3.attn_q.weight' gives module attn_q, layer 3."""
    modules, layers = {}, set()
    for name in names:
        m = _BLOCK.match(name)
        if m:
            layers.add(int(m.group(1)))
            modules[m.group(2)] = None
        else:
            modules[name.removesuffix(".weight")] = None
    return sorted(modules), sorted(layers)


def ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _file_type(value) -> str | None:
    if value is None:
        return None
    import gguf

    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError, OverflowError):  # an unknown number, or not a number at all (a list, a string)
        return str(value)


def _alpha(alpha, ranks: list[int]) -> str:
    """The alpha row; a hostile file may hold a string, or a rank 0 (no scale to compute)."""
    if alpha is None:
        return "none (scale 1)"
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return f"{alpha!r} (not a number)"
    scale = f" (scale alpha/rank = {alpha / ranks[0]:g})" if len(ranks) == 1 and ranks[0] else ""
    return f"{alpha:g}{scale}"


def summarize(info: GGUFInfo) -> list[tuple[str, object]]:
    """(field, value) rows, in reading order; values of None are left out."""
    meta = info.metadata
    arch = info.architecture
    adapter = meta.get("general.type") == "adapter"
    rows: list[tuple[str, object]] = [
        ("file", f"{info.path} ({info.size / 1e6:.2f} MB)"),
        ("type", "LoRA adapter" if adapter else meta.get("general.type", "model")),
        ("architecture", arch),
        ("name", meta.get("general.name")),
    ]
    if adapter:
        pairs = [n.removesuffix(LORA_A) for n in info.tensors if n.endswith(LORA_A)]
        ranks = sorted({info.tensors[n][0] for n in info.tensors if n.endswith(LORA_B)})
        modules, layers = _targets(pairs)
        alpha = meta.get("adapter.lora.alpha")
        rows += [
            ("rank", ", ".join(map(str, ranks))),
            ("alpha", _alpha(alpha, ranks)),
            ("targets", f"{len(pairs)} weights: {', '.join(modules)}"),
            ("layers", ranges(layers)),
            ("task", meta.get("adapter.lora.task_name")),
            ("made for", meta.get("edgelora.base.file") or meta.get("edgelora.source.base_model_name_or_path")),
        ]
    else:
        params = sum(math.prod(ne) for ne in info.tensors.values())
        rows += [
            ("parameters", f"{params / 1e6:.1f} M"),
            ("quantization", _file_type(meta.get("general.file_type"))),
            ("layers", meta.get(f"{arch}.block_count")),
            ("embedding", meta.get(f"{arch}.embedding_length")),
            ("heads", _heads(meta, arch)),
            ("context", meta.get(f"{arch}.context_length")),
            ("chat template", "yes" if "tokenizer.chat_template" in meta else "no"),
        ]
    rows.append(("tensors", f"{len(info.tensors)} (--tensors lists them, --metadata every key, --json both)"))
    return [(k, v) for k, v in rows if v is not None]


def _heads(meta, arch) -> str | None:
    heads, kv = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.attention.head_count_kv")
    if heads is None:
        return None
    return f"{heads}" + (f" ({kv} KV)" if kv is not None and kv != heads else "")
