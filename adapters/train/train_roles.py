"""Training recipe for the bundled roles: PEFT LoRA on the embedded SmolLM2 base, CPU only.

    pip install -e ".[train]"          # torch==2.13.0 (CPU), transformers, peft
    python adapters/train/train_roles.py                 # all roles
    python adapters/train/train_roles.py --roles pirate  # one role

For each role: the base answers the training prompts (greedy, through llama.cpp), a deterministic
transform rewrites the answers in the role's style (roles_data.py), a rank-8 LoRA on q/v/o is
trained on them (loss on the answer tokens only; the loop is edgelora/train/loop.py, shared with
`edgelora roles train`), saved as PEFT safetensors (f16), converted with
edgelora's converter, and described by a role manifest. Seeded; same inputs give the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ADAPTERS = HERE.parent
sys.path.insert(0, str(HERE))

import roles_data  # noqa: E402

from edgelora import Engine  # noqa: E402
from edgelora.convert import convert_peft  # noqa: E402
from edgelora.models.gguf_info import sha256_file  # noqa: E402
from edgelora.models.catalog import default_model_path  # noqa: E402
from edgelora.train.data import encode  # noqa: E402
from edgelora.train.loop import add_lora, load_base, save_peft, train  # noqa: E402

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
    return [encode(engine, [{"role": "user", "content": p}], transform(a)) for p, a in zip(prompts, answers)]


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

    hf = load_base(base_path)
    for role in args.roles:
        transform, metric, threshold, description = roles_data.ROLES[role]
        t0 = time.perf_counter()
        model = add_lora(hf, seed=args.seed)
        t_train = time.perf_counter()
        losses = train(model, examples(engine, prompts, answers, transform), args.steps, args.batch, args.lr, args.seed)
        t_elapsed = time.perf_counter() - t_train
        src = ADAPTERS / role
        save_peft(model, src, base_repo="HuggingFaceTB/SmolLM2-135M-Instruct")
        hf = model.unload()
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
