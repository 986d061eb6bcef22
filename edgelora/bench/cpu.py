"""`edgelora bench` CPU section: threads and OpenMP wait policy, idle and under a competing load;
llama.cpp's extra CPU buffers on vs off; what the one-time CPU probe costs.

OpenMP reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when llama.cpp's CPU library loads, so every variant runs in its
own child process. The competing load is one bounded busy loop per core, as a browser and a
compiler would be on a laptop."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from edgelora.safety import cpu

GEN_TOKENS = 48
CAP_S = 12.0  # a variant that collapses under load stops here; its rate is what it managed

_CHILD = """
import json, sys, threading, time
from edgelora import Engine
model, threads, extra, n, cap = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
eng = Engine(model, n_ctx=1024, n_threads=threads, cpu_extra_buffers=extra)
eng.complete("warm up", max_tokens=2, temperature=0)
long = "The lighthouse keeper wrote the weather, the ships and the oil left in the tank. " * 20
eng.reuse_prefix = False
t0 = time.perf_counter()
pp = eng.complete(long, max_tokens=1, temperature=0)
pp_rate = pp.prompt_tokens / (time.perf_counter() - t0)
timer = threading.Timer(cap, eng.cancel)
timer.start()
out = eng.complete("Once upon a time, in a small village by the sea,", max_tokens=n, temperature=0)
timer.cancel()
print(json.dumps({"gen_tok_s": out.completion_tokens / out.total_s, "prompt_tok_s": pp_rate,
                  "tokens": out.completion_tokens, "capped": out.finish_reason == "cancelled"}))
"""


# OpenMP waiting: what edgelora sets by default (edgelora/__init__.py) and the two standard policies.
WAITS = {
    "default": {"GOMP_SPINCOUNT": "10000"},
    "active": {"OMP_WAIT_POLICY": "active"},
    "passive": {"OMP_WAIT_POLICY": "passive"},
}


def _variant(model: Path, threads: int, wait: str, extra: str = "auto") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | WAITS[wait]
    out = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(threads), extra, str(GEN_TOKENS), str(CAP_S)],
                         capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


_SPIN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


class CompetingLoad:
    """One busy process per core, each bounded in time so nothing outlives the bench."""

    def __init__(self, seconds: float = 600.0):
        self.seconds = seconds
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(s=self.seconds)])
                      for _ in range(cpu.default_threads())]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def bench_cpu(model: Path, repeat: int, say: Callable[[str], None]) -> dict:
    cores = cpu.default_threads()
    thread_choices = sorted({1, cores})
    combos = [(t, pol) for t in thread_choices for pol in WAITS]
    result: dict = {"cores": cores, "features": cpu.cpu_features(), "gen_tokens": GEN_TOKENS, "cap_s": CAP_S}

    def measure() -> dict:
        runs: dict[str, list[dict]] = {f"threads={t},omp={pol}": [] for t, pol in combos}
        for _ in range(repeat):  # interleaved so noise hits every variant alike
            for t, pol in combos:
                runs[f"threads={t},omp={pol}"].append(_variant(model, t, pol))
        return {k: _median_of(v) for k, v in runs.items()}

    say("CPU: threads x OpenMP wait policy, idle...")
    result["idle"] = measure()
    say(f"CPU: threads x OpenMP wait policy, under a busy loop on each of {cores} cores...")
    with CompetingLoad():
        result["loaded"] = measure()
    default = f"threads={cores},omp=default"
    best_idle = max(v.get("gen_tok_s", 0) for v in result["idle"].values()) or 1.0
    result["default"] = default
    result["default_idle_vs_best_idle"] = result["idle"][default].get("gen_tok_s", 0) / best_idle
    active_loaded = result["loaded"][f"threads={cores},omp=active"].get("gen_tok_s", 0)
    result["default_loaded_vs_active_loaded"] = (
        result["loaded"][default].get("gen_tok_s", 0) / active_loaded if active_loaded else None)

    say("CPU: llama.cpp extra buffers on vs off (idle)...")
    ext: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(repeat):
        for mode in ext:
            ext[mode].append(_variant(model, cores, "default", mode))
    result["extra_buffers"] = {k: _median_of(v) for k, v in ext.items()}
    on, off = result["extra_buffers"]["on"], result["extra_buffers"]["off"]
    if "error" not in on and "error" not in off:
        result["extra_buffers"]["off_vs_on_gen"] = off["gen_tok_s"] / on["gen_tok_s"]
        result["extra_buffers"]["off_vs_on_prompt"] = off["prompt_tok_s"] / on["prompt_tok_s"]

    say("CPU: probe cost, first run vs later runs...")
    first, later = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("EDGELORA_CACHE_DIR")
            os.environ["EDGELORA_CACHE_DIR"] = tmp
            try:
                t0 = time.perf_counter()
                cpu.decide(model, "auto", file_type=_file_type(model))
                first.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                cpu.decide(model, "auto", file_type=_file_type(model))
                later.append(time.perf_counter() - t0)
            finally:
                if old is None:
                    os.environ.pop("EDGELORA_CACHE_DIR", None)
                else:
                    os.environ["EDGELORA_CACHE_DIR"] = old
    result["probe"] = {"first_run_s": statistics.median(first), "later_runs_s": statistics.median(later)}
    return result


def _file_type(model: Path):
    from edgelora.models.gguf_info import read_gguf

    return read_gguf(model).metadata.get("general.file_type")


def _median_of(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    return {k: statistics.median(r[k] for r in good) for k in ("gen_tok_s", "prompt_tok_s", "tokens")} | {
        "capped": any(r["capped"] for r in good)}


def cpu_rows(r: dict) -> list[tuple[str, str]]:
    rows = []
    for load in ("idle", "loaded"):
        for k, v in r[load].items():
            mark = " (default)" if k == r["default"] else ""
            val = v.get("error") or f"{v['gen_tok_s']:.1f} tok/s gen, {v['prompt_tok_s']:.0f} tok/s prompt" + (
                " (capped)" if v.get("capped") else "")
            rows.append((f"{load}: {k}{mark}", val))
    rows.append(("default idle / best idle", f"{r['default_idle_vs_best_idle']:.2f}x"))
    if r["default_loaded_vs_active_loaded"] is not None:
        rows.append(("default loaded / OpenMP active loaded", f"{r['default_loaded_vs_active_loaded']:.1f}x"))
    ext = r["extra_buffers"]
    if "off_vs_on_gen" in ext:
        rows.append(("extra buffers off / on: generation", f"{ext['off_vs_on_gen']:.2f}x"))
        rows.append(("extra buffers off / on: prompt", f"{ext['off_vs_on_prompt']:.2f}x"))
    rows.append(("CPU probe: first run / later runs",
                 f"{r['probe']['first_run_s']:.2f} s / {r['probe']['later_runs_s'] * 1e3:.1f} ms"))
    return rows
