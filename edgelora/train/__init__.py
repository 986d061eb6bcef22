"""`edgelora roles train`: a LoRA role made from a file of examples, on the CPU.

data.py reads and checks the examples with the standard library only, so a bad file is refused in
a moment; loop.py (torch, PEFT) and role.py import torch lazily. Only modules under this folder may
import torch, transformers or peft (the `train` extra)."""

# LoRA settings of the bundled roles (adapters/train/train_roles.py), the defaults of `roles train`:
# rank 8 on q/v/o learns a style from a few dozen answers and adds ~1 MB (f16) to a 135M base.
RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj", "o_proj")
