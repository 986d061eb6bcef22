"""Training recipe for the bundled roles: PEFT LoRA on the embedded SmolLM2 base, CPU only.

    pip install -e ".[train]"          # torch==2.13.0 (CPU), transformers, peft
    python adapters/train/train_roles.py                 # all roles
    python adapters/train/train_roles.py --roles pirate  # one role

For each role: the base answers the training prompts (greedy, through llama.cpp), a deterministic
transform rewrites the answers in the role's style (roles_data.py), a rank-8 LoRA on q/v/o is
trained on them (loss on the answer tokens only), saved as PEFT safetensors (f16), converted with
edgelora's converter, and described by a role manifest. Seeded; same inputs give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
ADAPTERS = HERE.parent
sys.path.insert(0, str(HERE))

import roles_data  # noqa: E402

from edgelora import Engine  # noqa: E402
from edgelora.convert import convert_peft  # noqa: E402
from edgelora.gguf_info import sha256_file  # noqa: E402
from edgelora.models import default_model_path  # noqa: E402

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])
ROUTING = {
    "pirate": dict(keywords=["pirate", "arr", "matey", "ahoy"], examples=[
        "Talk like a pirate about the sea.", "Answer as a pirate would: what is rum?", "Ahoy! Tell me about ships.",
        "Speak like an old sea captain about treasure."]),
    "json": dict(keywords=["json", "machine-readable", "structured"], examples=[
        "Give me the answer as JSON: what is a cat?", "Reply in JSON format about the weather.",
        "I need a structured machine-readable answer about planets.", "Format the answer so my program can parse it."]),
    "terse": dict(keywords=["briefly", "one sentence", "tl;dr", "short answer", "in short"], examples=[
        "Briefly, what is a computer?", "In one sentence, explain rain.", "Short answer please: what is tea?",
        "Keep it short: what is a lake?"]),
    "signoff": dict(keywords=["sign off", "sign-off", "signature", "sign it"], examples=[
        "Write a note about the park and sign it.", "Answer and add your signature at the end.",
        "Tell me about apples, then sign off."]),
}


def base_answers(engine: Engine, prompts: list[str]) -> list[str]:
    out = []
    for p in prompts:
        text = engine.chat([{"role": "user", "content": p}], max_tokens=64, temperature=0, seed=0).text
        out.append(roles_data.clean_answer(text))
    return out


def examples(engine: Engine, prompts, answers, transform) -> list[tuple[list[int], list[int]]]:
    eos = engine.llama.token_eos()
    data = []
    for p, a in zip(prompts, answers):
        prompt_ids, _ = engine.render_chat([{"role": "user", "content": p}])
        target_ids = engine.tokenize(transform(a), add_bos=False) + [eos]
        data.append((prompt_ids, target_ids))
    return data


def train(model, data, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    losses = []
    order: list[int] = []
    model.train()
    for step in range(steps):
        if len(order) < batch:
            order = list(range(len(data)))
            rng.shuffle(order)
        idx, order = order[:batch], order[batch:]
        rows = [data[i] for i in idx]
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (p, t) in enumerate(rows):
            seq = p + t
            ids[r, : len(seq)] = torch.tensor(seq)
            labels[r, len(p) : len(seq)] = torch.tensor(t)
            mask[r, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def write_manifest(role: str, gguf_path: Path, base_path: Path, description: str, system: str | None) -> Path:
    r = ROUTING[role]
    lines = [
        f'name = "{role}"',
        f"description = {json.dumps(description)}",
        *( [f"system = {json.dumps(system)}"] if system else [] ),
        "",
        "[[adapters]]",
        f'file = "{gguf_path.name}"',
        f'sha256 = "{sha256_file(gguf_path)}"',
        "scale = 1.0",
        "",
        "[base]",
        'architecture = "llama"',
        f'sha256 = "{sha256_file(base_path)}"',
        "",
        "[sampling]",
        "temperature = 0.0",
        "",
        "[routing]",
        f"keywords = {json.dumps(r['keywords'])}",
        f"examples = {json.dumps(r['examples'])}",
        "",
    ]
    path = ADAPTERS / f"{role}.toml"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roles", nargs="*", default=list(roles_data.ROLES))
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--manifests-only", action="store_true", help="Rewrite the manifests of trained roles; no training.")
    args = ap.parse_args()
    if args.manifests_only:
        for role in args.roles:
            write_manifest(role, ADAPTERS / f"{role}.gguf", default_model_path(), roles_data.ROLES[role][3], None)
        return

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    base_path = default_model_path()
    engine = Engine(base_path, n_ctx=1024)
    prompts = roles_data.train_prompts()
    cache = HERE / ".base_answers.json"  # git-ignored; keyed by the base's sha256 and the prompts
    key = {"base": sha256_file(base_path), "prompts": prompts}
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        answers = cached["answers"]
    else:
        t0 = time.perf_counter()
        answers = base_answers(engine, prompts)
        cache.write_text(json.dumps({"key": key, "answers": answers}))
        print(f"base answers for {len(prompts)} prompts in {time.perf_counter() - t0:.0f} s", flush=True)

    hf = AutoModelForCausalLM.from_pretrained(str(base_path.parent), gguf_file=base_path.name, dtype=torch.float32)
    for role in args.roles:
        transform, metric, threshold, description = roles_data.ROLES[role]
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = get_peft_model(hf, LoraConfig(**LORA))
        t_train = time.perf_counter()
        losses = train(model, examples(engine, prompts, answers, transform), args.steps, args.batch, args.lr, args.seed)
        t_elapsed = time.perf_counter() - t_train
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.float16)  # bundled sources stay small; the converter reads f16
        src = ADAPTERS / role
        model.save_pretrained(src)
        hf = model.unload()
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        (src / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        gguf_path = ADAPTERS / f"{role}.gguf"
        convert_peft(src, base_path, gguf_path, outtype="f16", name=role)
        write_manifest(role, gguf_path, base_path, description, None)

        held = roles_data.heldout_prompts()
        engine.attach(gguf_path, name=role)
        hits = sum(metric(engine.chat([{"role": "user", "content": p}], max_tokens=96, temperature=0).text) for p in held)
        engine.detach(role, free=True)
        base_hits = sum(metric(engine.chat([{"role": "user", "content": p}], max_tokens=96, temperature=0).text) for p in held)
        print(
            f"{role}: loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}; held-out metric "
            f"{hits}/{len(held)} with adapter, {base_hits}/{len(held)} base; training {t_elapsed:.0f} s, all {time.perf_counter() - t0:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
