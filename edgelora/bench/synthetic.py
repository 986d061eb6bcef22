"""Synthetic LoRA adapters for the benchmarks: random, on every layer, written to a temp folder, so the
figures do not depend on what is installed."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from edgelora.models.gguf_info import read_gguf

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_synthetic_adapter(path: Path, base_path: Path, rank: int = 8, seed: int = 0, std: float = 0.02,
                            projections: tuple[str, ...] = PROJECTIONS) -> Path:
    """A random LoRA on the given projections of every layer (numpy shapes: a (r, n_in), b (n_out, r))."""
    info = read_gguf(base_path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), info.architecture)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for name, ne in info.tensors.items():
        if name.startswith("blk.") and name.split(".")[2] in projections:
            n_in, n_out = ne
            writer.add_tensor(name + ".lora_a", (rng.standard_normal((rank, n_in)) * std).astype(np.float16))
            writer.add_tensor(name + ".lora_b", (rng.standard_normal((n_out, rank)) * std).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
