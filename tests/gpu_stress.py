"""Switch adapters, then decode, many times on the GPU device, each run in its own process, and
count the runs that die: the investigation behind edgelora/gpu_adapters.py (README 'GPU offload').

    vk=$(sh packaging/vulkan-wheel.sh --env) && eval "$vk"
    .venv/bin/python tests/gpu_stress.py --runs 10 --switches 6

Each run: load SmolLM2 with every layer on the device, load two random adapters, then per switch
set one set of adapters (a, b, none, in turn) and decode a short prompt and two tokens.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(switches: int, adapters: list[str], kv_cache_bytes: int) -> None:
    from edgelora import Engine

    os.environ["EDGELORA_GPU_ADAPTERS"] = "on"  # the guard's probe is what is being studied here
    with Engine(n_gpu_layers=-1, n_ctx=256, kv_cache_bytes=kv_cache_bytes) as eng:
        eng.load(adapters[0], name="a")
        eng.load(adapters[1], name="b")
        plan = [{"a": 1.0}, {"b": 1.0}, {}]
        for i in range(switches):
            eng.set_adapters(plan[i % 3])
            eng.new_conversation()
            eng.complete("The sea is", max_tokens=2, temperature=0.0)
    print("ok", flush=True)


def make_adapters(folder: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from edgelora.models.gguf_info import read_gguf
    from edgelora.models.catalog import default_model_path
    from tests import gguf_factory as gf

    shapes = read_gguf(default_model_path()).tensors
    layers = range(0, 30, 3)
    a = gf.random_lora(shapes, [f"blk.{i}.attn_q.weight" for i in layers], rank=8, seed=11, std=0.12)
    b = gf.random_lora(shapes, [f"blk.{i}.attn_v.weight" for i in layers], rank=8, seed=22, std=0.12)
    return [str(gf.write_lora(folder / "a.gguf", a, alpha=16.0)), str(gf.write_lora(folder / "b.gguf", b, alpha=16.0))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--kv-cache-bytes", type=int, default=256 << 20, help="the engine's KV state cache (0: off)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        one_run(args.switches, args.child, args.kv_cache_bytes)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp))
        outcomes: collections.Counter = collections.Counter()
        t0 = time.perf_counter()
        for i in range(args.runs):
            cmd = [sys.executable, __file__, "--switches", str(args.switches),
                   "--kv-cache-bytes", str(args.kv_cache_bytes), "--child", *adapters]
            try:
                child = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                rc = child.returncode
                what = "ok" if rc == 0 and child.stdout.strip().endswith("ok") else (
                    signal.Signals(-rc).name if rc < 0 else f"exit {rc}")
                tail = child.stderr.strip().splitlines()[-1:] if what != "ok" else []
            except subprocess.TimeoutExpired:
                what, tail = "timeout", []
            outcomes[what] += 1
            print(f"run {i + 1}/{args.runs}: {what} {tail[0][:200] if tail else ''}", flush=True)
        print(f"{dict(outcomes)} in {time.perf_counter() - t0:.0f} s "
              f"({args.runs} runs x {args.switches} switches)")
    return 0 if set(outcomes) == {"ok"} else 1


if __name__ == "__main__":
    sys.exit(main())
