"""`edgelora bench`: measures in one run, so every figure has its baseline from the same moment.

Adapters: synthetic rank-8 LoRAs on every attention and MLP projection of the base (written to a
temp folder), so the figures do not depend on what is installed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import gguf
import llama_cpp
import numpy as np

from .engine import Engine
from .gguf_info import read_gguf
from .models import resolve_model

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROMPT = "Once upon a time, in a small village by the sea,"
CHAT = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]


def write_synthetic_adapter(path: Path, base_path: Path, rank: int = 8, seed: int = 0, std: float = 0.02) -> Path:
    """A random LoRA on every projection of every layer of the base (numpy shapes: a (r, n_in), b (n_out, r))."""
    info = read_gguf(base_path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), info.architecture)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for name, ne in info.tensors.items():
        if name.startswith("blk.") and name.split(".")[2] in PROJECTIONS:
            n_in, n_out = ne
            writer.add_tensor(name + ".lora_a", (rng.standard_normal((rank, n_in)) * std).astype(np.float16))
            writer.add_tensor(name + ".lora_b", (rng.standard_normal((n_out, rank)) * std).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _median(fn: Callable[[], float], n: int) -> float:
    return statistics.median(fn() for _ in range(n))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_bench(model=None, n_tokens: int = 64, repeat: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    say = progress or (lambda _msg: None)
    model_path = resolve_model(model)
    tmp = Path(tempfile.mkdtemp(prefix="edgelora-bench-"))
    a = write_synthetic_adapter(tmp / "a.gguf", model_path, seed=1)
    b = write_synthetic_adapter(tmp / "b.gguf", model_path, seed=2)
    result: dict = {"model": str(model_path), "adapter_bytes": a.stat().st_size, "n_tokens": n_tokens, "repeat": repeat}

    say("switching and attach...")
    eng = Engine(model_path, n_ctx=2048)
    cold = []
    for i in range(repeat):
        cold.append(_timed(lambda: eng.attach(a, name=f"cold{i}")))
        eng.free(f"cold{i}")
    eng.attach(a, name="a")
    eng.load(b, name="b")
    sides = [{"b": 1.0}, {"a": 1.0}]
    switch = [_timed(lambda s=sides[i % 2]: eng.set_adapters(s)) for i in range(200)]
    switch_tok = []
    for i in range(max(5, repeat)):
        eng.set_adapters(sides[i % 2])
        eng.complete(PROMPT, max_tokens=1, temperature=0)  # warm the KV for this side
        t0 = time.perf_counter()
        eng.set_adapters(sides[(i + 1) % 2])
        eng.complete(PROMPT, max_tokens=1, temperature=0)
        switch_tok.append(time.perf_counter() - t0)
    result["switch_ms"] = statistics.median(switch) * 1e3
    result["switch_plus_first_token_ms"] = statistics.median(switch_tok) * 1e3
    result["cold_attach_ms"] = statistics.median(cold) * 1e3

    say("reload baseline (llama-cpp-python Llama(lora_path=...))...")
    reload, reload_tok = [], []
    for i in range(repeat):
        t0 = time.perf_counter()
        raw = llama_cpp.Llama(str(model_path), lora_path=str(b if i % 2 else a), n_ctx=2048, verbose=False)
        reload.append(time.perf_counter() - t0)
        raw.create_completion(PROMPT, max_tokens=1, temperature=0)
        reload_tok.append(time.perf_counter() - t0)
        raw.close()
    result["reload_ms"] = statistics.median(reload) * 1e3
    result["reload_plus_first_token_ms"] = statistics.median(reload_tok) * 1e3
    result["switch_speedup_vs_reload"] = result["reload_ms"] / result["switch_ms"]
    result["switch_plus_token_speedup_vs_reload"] = result["reload_plus_first_token_ms"] / result["switch_plus_first_token_ms"]

    say("generation throughput...")

    def ours(scales: dict) -> float:
        eng.set_adapters(scales)
        out = eng.complete(PROMPT, max_tokens=n_tokens, temperature=0)
        return out.completion_tokens / out.total_s

    raw = llama_cpp.Llama(str(model_path), lora_path=str(a), n_ctx=2048, verbose=False)

    def raw_rate() -> float:
        raw.reset()
        t0 = time.perf_counter()
        out = raw.create_completion(PROMPT, max_tokens=n_tokens, temperature=0)
        return out["usage"]["completion_tokens"] / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {"base": [], "one_adapter": [], "two_adapters": [], "raw_llama_cpp_one_adapter": []}
    for _ in range(repeat):  # interleaved, so machine noise hits every variant alike
        rates["base"].append(ours({}))
        rates["one_adapter"].append(ours({"a": 1.0}))
        rates["two_adapters"].append(ours({"a": 1.0, "b": 0.5}))
        rates["raw_llama_cpp_one_adapter"].append(raw_rate())
    raw.close()
    eng.close()
    result["tokens_per_s"] = {k: statistics.median(v) for k, v in rates.items()}
    result["one_adapter_vs_raw_ratio"] = result["tokens_per_s"]["one_adapter"] / result["tokens_per_s"]["raw_llama_cpp_one_adapter"]

    say("edgelora ask time to first token...")
    result["ask_first_token_s"] = _median(lambda: _ask_first_output(model_path), repeat)
    for f in (a, b):
        f.unlink()
    tmp.rmdir()
    return result


def _ask_first_output(model_path: Path) -> float:
    """Wall time from starting `edgelora ask` until its first byte of answer on stdout."""
    cmd = [sys.executable, "-m", "edgelora", "ask", "-m", str(model_path), "Say hello.", "--max-tokens", "8", "--temperature", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env={**os.environ})
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.communicate()
    return first


def print_table(r: dict) -> str:
    tps = r["tokens_per_s"]
    rows = [
        ("switch between resident adapters", f"{r['switch_ms']:.3f} ms"),
        ("  + first token after the switch", f"{r['switch_plus_first_token_ms']:.1f} ms"),
        ("cold attach (validate + load)", f"{r['cold_attach_ms']:.1f} ms"),
        ("reload baseline Llama(lora_path=)", f"{r['reload_ms']:.1f} ms"),
        ("  + first token", f"{r['reload_plus_first_token_ms']:.1f} ms"),
        ("switch speedup vs reload", f"{r['switch_speedup_vs_reload']:.0f}x"),
        ("  including first token", f"{r['switch_plus_token_speedup_vs_reload']:.1f}x"),
        ("tokens/s base", f"{tps['base']:.1f}"),
        ("tokens/s one adapter", f"{tps['one_adapter']:.1f}"),
        ("tokens/s two adapters", f"{tps['two_adapters']:.1f}"),
        ("tokens/s raw llama-cpp-python, one adapter", f"{tps['raw_llama_cpp_one_adapter']:.1f}"),
        ("ours / raw (one adapter)", f"{r['one_adapter_vs_raw_ratio']:.3f}"),
        ("edgelora ask: first output byte", f"{r['ask_first_token_s']:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
