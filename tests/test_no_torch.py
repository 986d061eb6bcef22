"""The runtime and the converter never import torch, transformers or peft."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "transformers", "peft")

SCRIPT = r"""
import sys, json
import edgelora, edgelora.cli, edgelora.engine, edgelora.bench, edgelora.gguf_info, edgelora.models
import edgelora.convert
from edgelora.convert import convert_peft
sys.path.insert(0, {tests!r})
from test_convert_refusals import make_peft
from pathlib import Path
folder = make_peft(Path({tmp!r}) / "src")
convert_peft(folder, {base!r}, Path({tmp!r}) / "out.gguf")
eng = edgelora.Engine({base!r})
eng.attach(Path({tmp!r}) / "out.gguf", name="x")
eng.complete("hi", max_tokens=2)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})))
"""


def test_runtime_and_converter_import_no_torch(tmp_path, smol_path):
    code = SCRIPT.format(tests=str(ROOT / "tests"), tmp=str(tmp_path), base=str(smol_path), forbidden=FORBIDDEN)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_no_import_statement_names_them():
    """Except in a folder named 'train' (edgelora/train/: `roles train`, the `train` extra)."""
    pattern = re.compile(rf"^\s*(import|from)\s+({'|'.join(FORBIDDEN)})\b", re.M)
    for folder in ("edgelora", "convert"):
        for path in (ROOT / folder).rglob("*.py"):
            if "train" not in path.relative_to(ROOT).parts[:-1]:
                assert not pattern.search(path.read_text()), path
    assert pattern.search((ROOT / "edgelora" / "train" / "loop.py").read_text())  # the check sees them
