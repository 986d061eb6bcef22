"""`edgelora bench`: measures in one run, so every figure has its baseline from the same moment.

Adapters: synthetic rank-8 LoRAs on every attention and MLP projection of the base (written to a
temp folder), so the figures do not depend on what is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np

from edgelora.bench.synthetic import write_synthetic_adapter
from edgelora.runtime import llama
from edgelora.runtime.engine import Engine
from edgelora.models.gguf_info import read_gguf
from edgelora.models.catalog import resolve_model
from edgelora.bench.contention import MachineWatch, not_idle_warning

PROMPT = "Once upon a time, in a small village by the sea,"
CHAT = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]


HF_PROJECTIONS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_synthetic_peft(folder: Path, base_path: Path, rank: int = 8, seed: int = 0) -> Path:
    """A PEFT LoRA folder (f32 safetensors) on every projection of every layer of a llama-family base."""
    from safetensors.numpy import save_file

    info = read_gguf(base_path)
    n_layers = int(info.metadata[f"{info.architecture}.block_count"])
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(n_layers):
        for hf, gg in HF_PROJECTIONS.items():
            n_in, n_out = info.tensors[f"blk.{i}.{gg}.weight"]
            key = f"base_model.model.model.layers.{i}.{hf}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) * 0.02).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * 0.02).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": [k.split(".")[-1] for k in HF_PROJECTIONS]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def bench_convert(base_path: Path, tmp: Path, repeat: int) -> dict:
    """Wall time and peak traced memory (numpy buffers included) of one PEFT -> GGUF conversion."""
    from edgelora.convert import convert_peft

    folder = write_synthetic_peft(tmp / "peft", base_path)
    size = (folder / "adapter_model.safetensors").stat().st_size
    out = tmp / "converted.gguf"
    times = [_timed(lambda: convert_peft(folder, base_path, out)) for _ in range(repeat)]
    tracemalloc.start()
    convert_peft(folder, base_path, out)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "adapter_bytes": size,
        "seconds": statistics.median(times),
        "peak_bytes": peak,
        "peak_vs_adapter": peak / size,
        "output_bytes": out.stat().st_size,
    }


def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _conversation(target_tokens: int, eng: Engine) -> list[dict]:
    """A fixed chat history of about ``target_tokens`` tokens."""
    filler = ("The lighthouse keeper wrote in his log every evening: the weather, the ships that passed, "
              "the state of the lamp and the oil left in the tank. ")
    history: list[dict] = [{"role": "system", "content": "You are a helpful assistant."}]
    i = 0
    while len(eng.render_chat(history)[0]) < target_tokens:
        history += [{"role": "user", "content": f"Entry {i}: " + filler * 2},
                    {"role": "assistant", "content": f"Noted entry {i}. " + filler}]
        i += 1
    return history


def bench_roles(model_path: Path, tmp: Path, repeat: int, say) -> dict:
    """Switching back mid-conversation, memory per resident adapter, and churn under a budget."""
    from edgelora.config import Config
    from edgelora.roles.residency import Registry
    from edgelora.roles.manifest import RoleAdapter, Role, Resolved
    from edgelora.files import sha256_file

    out: dict = {}
    a = write_synthetic_adapter(tmp / "ra.gguf", model_path, seed=11)
    b = write_synthetic_adapter(tmp / "rb.gguf", model_path, seed=12)
    question = [{"role": "user", "content": "What did the keeper write about the lamp?"}]

    def ttft(cache_bytes: int, switch: bool) -> float:
        with Engine(model_path, n_ctx=2048, kv_cache_bytes=cache_bytes) as eng:
            eng.load(a, name="a")
            eng.load(b, name="b")
            history = _conversation(1000, eng)
            out.setdefault("conversation_tokens", len(eng.render_chat(history + question)[0]))
            eng.set_adapters({"a": 1.0})
            eng.chat(history, max_tokens=1, temperature=0)
            if switch:
                eng.set_adapters({"b": 1.0})
                eng.chat(history, max_tokens=1, temperature=0)
                eng.set_adapters({"a": 1.0})
            return eng.chat(history + question, max_tokens=1, temperature=0).ttft_s

    say("switch back mid-conversation...")
    runs = {"no_switch": [], "switch_back_kv_state": [], "switch_back_reeval": []}
    for _ in range(repeat):
        runs["no_switch"].append(ttft(256 << 20, switch=False))
        runs["switch_back_kv_state"].append(ttft(256 << 20, switch=True))
        runs["switch_back_reeval"].append(ttft(0, switch=True))
    out["ttft_ms"] = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
    out["kv_state_vs_no_switch"] = out["ttft_ms"]["switch_back_kv_state"] / out["ttft_ms"]["no_switch"]
    out["reeval_vs_no_switch"] = out["ttft_ms"]["switch_back_reeval"] / out["ttft_ms"]["no_switch"]

    say("memory per resident adapter (20 adapters)...")
    files = [write_synthetic_adapter(tmp / f"m{i}.gguf", model_path, seed=100 + i) for i in range(20)]
    with Engine(model_path, n_ctx=512) as eng:
        eng.complete("warm up", max_tokens=1)
        before = _rss()
        for i, f in enumerate(files):
            eng.load(f, name=f"m{i}")
        grown = _rss() - before
        size = sum(f.stat().st_size for f in files)
        out["resident_20"] = {"rss_growth_bytes": grown, "files_bytes": size, "rss_vs_file": grown / size}
    for f in files:
        f.unlink()

    say("churn: 50 adapters, budget 5, 500 switches...")
    small = [write_synthetic_adapter(tmp / f"c{i}.gguf", model_path, seed=200 + i, projections=("attn_q", "attn_v"))
             for i in range(50)]
    roles = [Role(f"c{i}", None, adapters=[RoleAdapter(f, sha256_file(f))]) for i, f in enumerate(small)]
    with Engine(model_path, n_ctx=512) as eng:
        reg = Registry(eng, Config(max_resident_adapters=5))
        rss = []
        for i in range(500):
            role = roles[(i * 7) % 50]
            reg.apply(Resolved([(role.name, 1.0)], [(role.adapters[0], 1.0, role)], None, {}))
            if i % 10 == 9:
                eng.complete("hi", max_tokens=1)
            rss.append(_rss())
        warm = rss[100:]
        out["churn"] = {
            "switches": 500,
            "resident_at_end": len(eng.resident),
            "rss_after_warmup_min_mb": min(warm) / 1e6,
            "rss_after_warmup_max_mb": max(warm) / 1e6,
            "rss_spread": (max(warm) - min(warm)) / min(warm),
        }
    return out


def _median(fn: Callable[[], float], n: int) -> float:
    return statistics.median(fn() for _ in range(n))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


SECTIONS = ("core", "cpu", "server", "gpu")


def run_bench(model=None, n_tokens: int = 64, repeat: int = 3, progress: Callable[[str], None] | None = None,
              sections=None, peer_llama_server: Path | None = None, server_load: str = "0") -> dict:
    say = progress or (lambda _msg: None)
    sections = tuple(sections or SECTIONS)
    model_path = resolve_model(model)
    result: dict = {"model": str(model_path), "n_tokens": n_tokens, "repeat": repeat, "machine": {}}
    for section in SECTIONS:
        if section in sections:
            watch = MachineWatch()  # load average before/after: a busy machine is said, not hidden
            _run_section(section, result, model_path, n_tokens, repeat, say, peer_llama_server, server_load)
            result["machine"][section] = watch.finish()
            warning = not_idle_warning(section, result["machine"][section])
            if warning:
                say(warning)
    return result


def _run_section(section: str, result: dict, model_path: Path, n_tokens: int, repeat: int, say,
                 peer_llama_server: Path | None = None, server_load: str = "0") -> None:
    if section == "core":
        result.update(_bench_core(model_path, n_tokens, repeat, say))
    elif section == "cpu":
        from edgelora.bench.cpu import bench_cpu

        result["cpu"] = bench_cpu(model_path, repeat, say)
    elif section == "server":
        from edgelora.bench.server import bench_server

        result["server"] = bench_server(model_path, repeat, say, peer=peer_llama_server, load=server_load)
    elif section == "gpu":
        from edgelora.bench.gpu import bench_gpu

        result["gpu"] = bench_gpu(model_path, repeat, say)


def _bench_core(model_path: Path, n_tokens: int, repeat: int, say) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="edgelora-bench-"))
    a = write_synthetic_adapter(tmp / "a.gguf", model_path, seed=1)
    b = write_synthetic_adapter(tmp / "b.gguf", model_path, seed=2)
    result: dict = {"adapter_bytes": a.stat().st_size}

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
        raw = llama.baseline_llama(str(model_path), lora_path=str(b if i % 2 else a), n_ctx=2048)
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

    raw = llama.baseline_llama(str(model_path), lora_path=str(a), n_ctx=2048)

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

    result["roles"] = bench_roles(model_path, tmp, repeat, say)

    say("PEFT -> GGUF conversion...")
    result["convert"] = bench_convert(model_path, tmp, repeat)

    say("edgelora ask time to first token...")
    result["ask_first_token_s"] = _median(lambda: _ask_first_output(model_path), repeat)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _ask_first_output(model_path: Path) -> float:
    """Wall time from starting `edgelora ask` until its first byte of answer on stdout."""
    cmd = [sys.executable, "-m", "edgelora", "ask", "--no-log", "-m", str(model_path), "Say hello.", "--max-tokens", "8", "--temperature", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env={**os.environ})
    proc.stdout.read(1)
    first = time.perf_counter() - t0
    proc.communicate()
    return first


def print_table(r: dict) -> str:
    warnings = [w for section, m in r.get("machine", {}).items() if (w := not_idle_warning(section, m))]
    rows = _core_rows(r) if "tokens_per_s" in r else []
    if "cpu" in r:
        from edgelora.bench.cpu import cpu_rows

        rows += cpu_rows(r["cpu"])
    if "server" in r:
        from edgelora.bench.server import server_rows

        rows += server_rows(r["server"])
    if "gpu" in r:
        from edgelora.bench.gpu import gpu_rows

        rows += gpu_rows(r["gpu"])
    for section, m in r.get("machine", {}).items():
        rows.append((f"machine during {section}", ("idle" if m["idle"] else "busy") + f", load average {m['load_before']:.2f} -> {m['load_after']:.2f}"
                     + (f", other programs {m['others_cpu']:.2f} cores" if "others_cpu" in m else "")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(warnings + [f"{k:<{width}}  {v}" for k, v in rows])


def _core_rows(r: dict) -> list[tuple[str, str]]:
    tps = r["tokens_per_s"]
    return [
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
        (f"convert PEFT -> GGUF ({r['convert']['adapter_bytes'] / 1e6:.1f} MB, rank 8)", f"{r['convert']['seconds']:.3f} s"),
        ("TTFT, ~1000-token chat: no switch", f"{r['roles']['ttft_ms']['no_switch']:.1f} ms"),
        ("  switch back, KV state restored", f"{r['roles']['ttft_ms']['switch_back_kv_state']:.1f} ms ({r['roles']['kv_state_vs_no_switch']:.2f}x)"),
        ("  switch back, history re-evaluated", f"{r['roles']['ttft_ms']['switch_back_reeval']:.1f} ms ({r['roles']['reeval_vs_no_switch']:.2f}x)"),
        ("RSS growth / file size, 20 resident", f"{r['roles']['resident_20']['rss_vs_file']:.2f}x"),
        ("churn 500 switches, budget 5: RSS spread", f"{r['roles']['churn']['rss_spread'] * 100:.1f}% ({r['roles']['churn']['resident_at_end']} resident at end)"),
        ("  peak memory / adapter size", f"{r['convert']['peak_vs_adapter']:.2f}x ({r['convert']['peak_bytes'] / 1e6:.1f} MB)"),
    ]
