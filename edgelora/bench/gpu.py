"""`edgelora bench` GPU section: the model with every layer on the GPU device against the same
build on the CPU, in one run: how far the device's logits are from the CPU's, whether the top
token agrees, prompt and generation speed, the first prompt's extra cost (shader compilation)
and an adapter switch on the device.

On llvmpipe (a software Vulkan device) the speeds say nothing about a real GPU; the logit figures
say whether the offload path computes the same model."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgelora.runtime.backend import backend_info
from edgelora.runtime.engine import Engine
from edgelora.errors import AdapterError

PROMPTS = [
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me three tips for writing clear emails.",
    "Explain what a LoRA adapter is, briefly.",
]
GEN_TOKENS = 16
LONG = "The lighthouse keeper wrote the weather, the ships and the oil left in the tank. " * 8


def bench_gpu(model_path: Path, repeat: int, say) -> dict:
    b = backend_info()
    if not b.offload_devices:
        why = "CPU-only llama.cpp build" if b.build == "CPU" else f"the {b.build} build sees no GPU device"
        return {"skipped": why}
    from edgelora.bench.run import write_synthetic_adapter

    tmp = Path(tempfile.mkdtemp(prefix="edgelora-bench-gpu-"))
    adapter = write_synthetic_adapter(tmp / "a.gguf", model_path, seed=1, std=0.05)
    result: dict = {}
    engines = {}
    for where, layers in (("cpu", 0), ("device", -1)):
        say(f"gpu: {where} engine...")
        t0 = time.perf_counter()
        eng = Engine(model_path, n_gpu_layers=layers, n_ctx=1024, kv_cache_bytes=0, reuse_prefix=False)
        first = eng.complete(LONG, max_tokens=1, temperature=0.0)  # the device compiles its shaders here
        result[f"{where}_load_and_first_prompt_s"] = round(time.perf_counter() - t0, 2)
        pp, gen = [], []
        for _ in range(repeat):
            out = eng.complete(LONG, max_tokens=1, temperature=0.0)
            pp.append(out.prompt_tokens / out.total_s)
            out = eng.complete("Once upon a time, in a small village by the sea,", max_tokens=GEN_TOKENS, temperature=0.0)
            gen.append(out.tokens_per_s)
        result[f"{where}_prompt_tok_s"] = round(float(np.median(pp)), 2)
        result[f"{where}_gen_tok_s"] = round(float(np.median(gen)), 2)
        result["prompt_tokens"] = first.prompt_tokens
        engines[where] = eng
    result["device"] = engines["device"].device

    try:
        say("gpu: logits, device vs CPU...")
        diffs = []
        for adapters in ({}, {"a": 1.0}):
            for eng in engines.values():
                if adapters and "a" not in eng.resident:
                    eng.load(adapter, name="a")
                eng.set_adapters(adapters)
            for prompt in PROMPTS:
                tokens = engines["cpu"].render_chat([{"role": "user", "content": prompt}])[0]
                cpu_logits, dev_logits = engines["cpu"].logits(tokens), engines["device"].logits(tokens)
                d = np.abs(cpu_logits - dev_logits)
                top2 = np.sort(cpu_logits)[-2:]
                diffs.append({"adapter": bool(adapters), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
                              "top1_same": int(np.argmax(cpu_logits)) == int(np.argmax(dev_logits)),
                              "cpu_top2_gap": float(top2[1] - top2[0]),  # a near-tie may flip between devices
                              "logit_range": float(cpu_logits.max() - cpu_logits.min())})
        result["logits"] = {
            "cases": len(diffs),
            "max_abs": [round(min(x["max_abs"] for x in diffs), 3), round(max(x["max_abs"] for x in diffs), 3)],
            "mean_abs": [round(min(x["mean_abs"] for x in diffs), 3), round(max(x["mean_abs"] for x in diffs), 3)],
            "top1_agree": sum(x["top1_same"] for x in diffs),
            "top1_disagree_cpu_gaps": [round(x["cpu_top2_gap"], 3) for x in diffs if not x["top1_same"]],
            "per_case": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in diffs],
            "largest_logit_range": round(max(x["logit_range"] for x in diffs), 1),
        }

        say("gpu: adapter switch on the device...")
        dev = engines["device"]
        switch = []
        for i in range(2 * repeat):
            t0 = time.perf_counter()
            dev.set_adapters({"a": 1.0} if i % 2 == 0 else {})
            dev.complete("The sea is", max_tokens=1, temperature=0.0)
            switch.append(time.perf_counter() - t0)
        result["device_switch_plus_first_token_ms"] = round(1000 * float(np.median(switch)), 1)
    except AdapterError as exc:  # the adapter check refused this device: say so, keep the rest
        result["adapters"] = f"refused: {exc}"
    finally:
        for eng in engines.values():
            eng.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result["gen_ratio_device_vs_cpu"] = round(result["device_gen_tok_s"] / result["cpu_gen_tok_s"], 3)
    result["prompt_ratio_device_vs_cpu"] = round(result["device_prompt_tok_s"] / result["cpu_prompt_tok_s"], 3)
    return result


def gpu_rows(r: dict) -> list[tuple[str, str]]:
    if "skipped" in r:
        return [("gpu", f"skipped: {r['skipped']}")]
    if "logits" not in r:
        return [("gpu device", r["device"]), ("  adapters", r.get("adapters", ""))]
    lg = r["logits"]
    return [
        ("gpu device", r["device"]),
        ("  logits vs CPU, max |Δ|", f"{lg['max_abs'][0]}–{lg['max_abs'][1]} (mean {lg['mean_abs'][0]}–{lg['mean_abs'][1]}; "
                                    f"logits span up to {lg['largest_logit_range']})"),
        ("  same top token as CPU", f"{lg['top1_agree']}/{lg['cases']} (base and with an adapter)"
                                    + (f"; where not, the CPU's top-2 gap was {lg['top1_disagree_cpu_gaps']}"
                                       if lg["top1_disagree_cpu_gaps"] else "")),
        ("  generation, device / CPU", f"{r['device_gen_tok_s']} / {r['cpu_gen_tok_s']} tok/s ({r['gen_ratio_device_vs_cpu']}x)"),
        ("  prompt, device / CPU", f"{r['device_prompt_tok_s']} / {r['cpu_prompt_tok_s']} tok/s ({r['prompt_ratio_device_vs_cpu']}x)"),
        ("  load + first prompt, device / CPU", f"{r['device_load_and_first_prompt_s']} / {r['cpu_load_and_first_prompt_s']} s"),
        ("  adapter switch + first token (device)", f"{r['device_switch_plus_first_token_ms']} ms"),
    ]
