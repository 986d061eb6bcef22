"""Make a Hugging Face model folder from a GGUF base, de-quantized: what vLLM (and PEFT) need
when the original Hugging Face checkpoint is not at hand.

    python packaging/gguf_to_hf.py BASE.gguf OUT_DIR [--dtype float32|bfloat16|float16]

Needs torch, transformers and accelerate (`pip install torch transformers accelerate`); the
edgelora runtime never imports them. The weights are the GGUF's quantized values, widened: the
result computes what the GGUF computes (up to the matmul arithmetic), not what the original did.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path


def convert(gguf_file: Path, out: Path, dtype: str = "float32") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = gguf_file.resolve()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # transformers marks a GGUF-loaded model as quantized and then refuses to save it; the weights
    # are plain tensors by now, so the markers are all that stands in the way.
    for obj in (model, model.config):
        for attr in ("hf_quantizer", "quantization_config", "quantization_method"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        print(f"gguf_to_hf: {args.gguf}: no such file", file=sys.stderr)
        return 2
    print(f"wrote {convert(args.gguf, args.out, args.dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
