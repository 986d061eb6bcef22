"""The LoRA training loop shared by `edgelora roles train` and the bundled roles' recipe
(adapters/train/train_roles.py): PEFT LoRA on the de-quantized GGUF base, loss on answer tokens only.
Imports torch, transformers and peft (the `train` extra)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from edgelora.train import ALPHA, RANK, TARGETS


def load_base(gguf_path: Path):
    """The GGUF the engine loads, de-quantized to f32 by transformers: the adapter is trained
    against the very weights it will meet."""
    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)


def add_lora(model, rank: int = RANK, alpha: int = ALPHA, targets=TARGETS, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets)))


def _batch(rows: list[tuple[list[int], list[int]]]):
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # -100: no loss on prompt and padding
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (p, t) in enumerate(rows):
        seq = p + t
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(p) : len(seq)] = torch.tensor(t)
        mask[r, : len(seq)] = 1
    return ids, mask, labels


def train(model, data: list[tuple[list[int], list[int]]], steps: int, batch: int, lr: float, seed: int,
          on_step: Callable[[int, float], None] | None = None, stop: Callable[[], bool] | None = None) -> list[float]:
    """AdamW with a 10-step warm-up and a linear decay; batches drawn by the seed, each example once
    per epoch. ``on_step(step, loss)`` after each step; ``stop()`` true ends the loop early."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    losses: list[float] = []
    order: list[int] = []
    model.train()
    for step in range(steps):
        if stop is not None and stop():
            break
        if len(order) < batch:
            order = list(range(len(data)))
            rng.shuffle(order)
        idx, order = order[:batch], order[batch:]
        ids, mask, labels = _batch([data[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def save_peft(model, folder: Path, base_repo: str | None = None) -> None:
    """PEFT safetensors in f16 (what the converter reads; half the size)."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.float16)
    model.save_pretrained(folder)
    if base_repo:
        cfg_path = folder / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_repo
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
