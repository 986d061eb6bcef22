"""Write small GGUF files for tests with the gguf package: a tiny F32 llama model that
tokenizes like SmolLM2, random LoRA adapters, and models with a LoRA merged into the weights.

Arrays here are numpy-shaped: a weight is (n_out, n_in), lora_a is (r, n_in), lora_b is (n_out, r).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TINY = dict(n_embd=64, n_ff=128, n_layer=2, n_head=4, n_head_kv=2)
ATTN_FFN = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def copy_tokenizer(src: Path, writer: gguf.GGUFWriter) -> int:
    """Copy tokenizer.* keys (vocab, merges, template...) from a GGUF; returns the vocab size."""
    reader = gguf.GGUFReader(src)
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif vtype == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))
    return n_vocab


def tiny_weights(n_vocab: int, seed: int = 0, **dims) -> dict[str, np.ndarray]:
    d = {**TINY, **dims}
    rng = np.random.default_rng(seed)
    e, ff, hd = d["n_embd"], d["n_ff"], d["n_embd"] // d["n_head"]
    kv = hd * d["n_head_kv"]

    def w(n_out, n_in):
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    weights = {"token_embd.weight": rng.standard_normal((n_vocab, e)).astype(np.float32) * 0.5}
    for i in range(d["n_layer"]):
        p = f"blk.{i}."
        weights.update({
            p + "attn_norm.weight": np.ones(e, np.float32),
            p + "attn_q.weight": w(e, e),
            p + "attn_k.weight": w(kv, e),
            p + "attn_v.weight": w(kv, e),
            p + "attn_output.weight": w(e, e),
            p + "ffn_norm.weight": np.ones(e, np.float32),
            p + "ffn_gate.weight": w(ff, e),
            p + "ffn_up.weight": w(ff, e),
            p + "ffn_down.weight": w(e, ff),
        })
    weights["output_norm.weight"] = np.ones(e, np.float32)
    weights["output.weight"] = w(n_vocab, e)
    return weights


def write_llama(path: Path, weights: dict[str, np.ndarray], tokenizer_from: Path, *, kv: dict | None = None, **dims) -> Path:
    d = {**TINY, **dims}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(512)
    writer.add_embedding_length(d["n_embd"])
    writer.add_block_count(d["n_layer"])
    writer.add_feed_forward_length(d["n_ff"])
    writer.add_head_count(d["n_head"])
    writer.add_head_count_kv(d["n_head_kv"])
    writer.add_rope_dimension_count(d["n_embd"] // d["n_head"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    copy_tokenizer(tokenizer_from, writer)
    for name, arr in weights.items():
        writer.add_tensor(name, arr)
    _finish(writer, kv)
    return path


def random_lora(
    base_shapes: dict[str, tuple[int, ...]],
    targets: list[str],
    rank: int = 4,
    seed: int = 1,
    std: float = 0.1,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{base tensor name: (lora_a (r, n_in), lora_b (n_out, r))}; base_shapes are GGUF ne [n_in, n_out]."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in targets:
        n_in, n_out = base_shapes[name]
        a = (rng.standard_normal((rank, n_in)) * std).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * std).astype(np.float32)
        out[name] = (a, b)
    return out


def write_lora(
    path: Path,
    lora: dict[str, tuple[np.ndarray, np.ndarray]],
    alpha: float | None,
    arch: str = "llama",
    *,
    general_type: str = "adapter",
    adapter_type: str = "lora",
    extra_tensors: dict[str, np.ndarray] | None = None,
    dtype=np.float32,
    kv: dict | None = None,
) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(general_type)
    writer.add_string("adapter.type", adapter_type)
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    for name, (a, b) in lora.items():
        writer.add_tensor(name + ".lora_a", a.astype(dtype))
        writer.add_tensor(name + ".lora_b", b.astype(dtype))
    for name, arr in (extra_tensors or {}).items():
        writer.add_tensor(name, arr)
    _finish(writer, kv)
    return path


def merge(weights: dict[str, np.ndarray], lora, alpha: float | None, scale: float) -> dict[str, np.ndarray]:
    """W + scale * alpha/r * B @ A: what llama.cpp computes at runtime, folded into the weights."""
    merged = dict(weights)
    for name, (a, b) in lora.items():
        rank = a.shape[0]
        factor = scale * (alpha / rank if alpha is not None else 1.0)
        merged[name] = (weights[name].astype(np.float64) + factor * (b.astype(np.float64) @ a)).astype(np.float32)
    return merged


def _finish(writer: gguf.GGUFWriter, kv: dict | None = None) -> None:
    """``kv``: {key: (value, GGUFValueType)} set or replaced as given, whatever type llama.cpp expects
    (hostile files for the hardening tests)."""
    for key, (value, vtype) in (kv or {}).items():
        writer.kv_data[0][key] = gguf.gguf_writer.GGUFValue(value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantize_model(src: Path, dst: Path, dtype=np.float32, untie: bool = False) -> Path:
    """Copy a GGUF model with every tensor de-quantized to f32 (or f16): the same weights that
    transformers de-quantizes, without llama.cpp's quantized matmul noise."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        keep_f32 = values.ndim == 1  # norms stay f32, as llama.cpp's converters write them
        writer.add_tensor(t.name, values.astype(np.float32 if keep_f32 else dtype))
        if untie and t.name == "token_embd.weight" and "output.weight" not in names:
            writer.add_tensor("output.weight", values.astype(dtype))  # same values, separate tensor
    _finish(writer)
    return dst
