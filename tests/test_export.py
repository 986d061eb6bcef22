"""`edgelora export`: the folders, roles.json and launch script it writes, the exact sum a stack
becomes, and refusals that leave nothing behind. (What the exports compute in PEFT is checked in
test_convert_fidelity.py; a real vLLM serving them in test_vllm_export.py.)"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from edgelora.frontends.cli.main import main
from edgelora.convert import to_peft
from edgelora.convert.converter import _permute
from edgelora.convert.peft_source import read_peft
from edgelora.roles.manifest import bundled_dir

from .conftest import write_role


def test_unpermute_inverts_the_converters_permutation():
    for n_head, n_kv, n_rows in ((9, 9, 576), (9, 3, 192)):  # SmolLM2's q and k
        rows = np.arange(n_rows * 3, dtype=np.float32).reshape(n_rows, 3)
        permuted = _permute(rows, n_head, n_kv)
        assert not np.array_equal(permuted, rows)
        assert np.array_equal(to_peft.unpermute(permuted, n_head, n_kv), rows)


def test_export_writes_peft_folders_roles_json_and_a_launch_script(tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "pirate", "terse", "pirate:0.7+terse:0.3", "--to", str(out), "--hf-base", "/models/smol"]) == 0
    doc = json.loads((out / "roles.json").read_text())
    assert set(doc["roles"]) == {"pirate", "terse", "pirate:0.7+terse:0.3"}
    assert doc["roles"]["pirate"]["method"] == "peft source"  # its PEFT source converts to exactly pirate.gguf
    assert doc["roles"]["pirate:0.7+terse:0.3"]["method"] == "from gguf"
    assert doc["roles"]["pirate:0.7+terse:0.3"]["rank"] == 16  # one LoRA of rank 8 + 8
    assert doc["roles"]["pirate"]["sampling"] == {"temperature": 0.0}
    assert doc["base"] | {"sha256": None} == {"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": None,
                                               "hf": "/models/smol", "hf_from": "--hf-base", "served_as": "base"}
    for role in doc["roles"].values():
        folder = out / role["adapter"]
        assert read_peft(folder).modules  # a PEFT folder our own reader accepts
        assert oct(os.stat(folder / "adapter_model.safetensors").st_mode & 0o777) == "0o644"
    script = (out / "launch-vllm.sh").read_text()
    assert os.access(out / "launch-vllm.sh", os.X_OK)
    assert "--enable-lora --max-lora-rank 16 --max-loras 3" in script
    assert 'pirate="$here"/pirate' in script and "HF_BASE=${HF_BASE:-/models/smol}" in script
    # what it runs, with PYTHON=echo standing in for the interpreter: absolute adapter paths, extra args last
    r = subprocess.run(["sh", str(out / "launch-vllm.sh"), "--port", "8000"], env={**os.environ, "PYTHON": "echo"},
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/smol",
                                "--served-model-name", "base", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "3",
                                "--lora-modules", f"pirate={out}/pirate", f"terse={out}/terse",
                                f"pirate:0.7+terse:0.3={out}/pirate@0.7+terse@0.3", "--port", "8000"]
    r = subprocess.run(["sh", str(out / "launch-vllm.sh")], env={**os.environ, "HF_BASE": "/other", "PYTHON": "echo"},
                       capture_output=True, text=True, check=True)
    assert "--model /other " in r.stdout
    assert (out / "pirate" / "adapter_model.safetensors").read_bytes() == \
        (bundled_dir() / "pirate" / "adapter_model.safetensors").read_bytes()


def test_stack_is_the_exact_weighted_sum_of_its_adapters(tmp_path, smol_path):
    """B@A of the exported stack == 0.7 * pirate + 0.3 * terse, module by module (llama.cpp's scaling)."""
    out = tmp_path / "st"
    to_peft.export_peft([(bundled_dir() / "pirate.gguf", 0.7), (bundled_dir() / "terse.gguf", 0.3)], smol_path, out)
    got = {m.module: m.scaling * (m.b.astype(np.float64) @ m.a) for m in read_peft(out).modules}
    want: dict[str, np.ndarray] = {}
    for name, scale in (("pirate", 0.7), ("terse", 0.3)):
        for m in read_peft(bundled_dir() / name).modules:  # the sources these GGUFs were converted from
            want[m.module] = want.get(m.module, 0) + scale * m.scaling * (m.b.astype(np.float64) @ m.a)
    assert set(got) == set(want)
    for module in want:
        assert np.linalg.norm(got[module] - want[module]) / np.linalg.norm(want[module]) < 2e-3, module


def test_a_scaled_role_is_exported_from_its_gguf_with_the_scale_in(tmp_path, smol_path):
    write_role(tmp_path / "roles", "halfpirate", bundled_dir() / "pirate.gguf", scale=0.5)
    out = tmp_path / "export"
    assert main(["export", "halfpirate", "--to", str(out), "--role-dir", str(tmp_path / "roles")]) == 0
    doc = json.loads((out / "roles.json").read_text())
    assert doc["roles"]["halfpirate"]["method"] == "from gguf"
    assert doc["base"]["hf"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the catalog knows the embedded base
    half = {m.module: m.scaling * (m.b @ m.a) for m in read_peft(out / "halfpirate").modules}
    full = {m.module: m.scaling * (m.b @ m.a) for m in read_peft(bundled_dir() / "pirate").modules}
    for module in full:
        assert np.allclose(half[module], 0.5 * full[module], rtol=1e-2, atol=1e-3 * np.abs(full[module]).max())


def test_re_export_replaces_the_old_folders(tmp_path):
    out = tmp_path / "export"
    assert main(["export", "pirate:0.7+terse:0.3", "--to", str(out)]) == 0
    (out / "pirate@0.7+terse@0.3" / "stale.txt").write_text("old")
    assert main(["export", "pirate:0.7+terse:0.3", "--to", str(out)]) == 0
    assert not (out / "pirate@0.7+terse@0.3" / "stale.txt").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("args, message", [
    (["nosuchrole"], "unknown role 'nosuchrole'"),
    (["base"], "role 'base' has no adapter"),
    (["pirate", "pirate"], "named twice"),
    (["pirate:x"], "must be a finite number"),
])
def test_bad_roles_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "export"
    assert main(["export", *args, "--to", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_folder_in_the_way_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "export"
    (out / "pirate@0.7+terse@0.3").mkdir(parents=True)
    (out / "pirate@0.7+terse@0.3" / "notes.txt").write_text("mine")
    assert main(["export", "pirate:0.7+terse:0.3", "--to", str(out)]) == 2
    assert "is not a PEFT adapter folder" in capsys.readouterr().err
    assert (out / "pirate@0.7+terse@0.3" / "notes.txt").read_text() == "mine"
    (out / "pirate").mkdir()  # a role exported from its PEFT source is guarded the same way
    (out / "pirate" / "notes.txt").write_text("mine too")
    assert main(["export", "pirate", "--to", str(out)]) == 2
    assert (out / "pirate" / "notes.txt").read_text() == "mine too"
    (tmp_path / "afile").write_text("x")
    assert main(["export", "pirate", "--to", str(tmp_path / "afile")]) == 2


def test_an_adapter_for_another_architecture_is_refused(tmp_path, smol_path, capsys):
    from edgelora.convert.errors import ConvertError

    from . import gguf_factory as gf

    lora = gf.random_lora({"blk.0.attn_q.weight": (576, 576)}, ["blk.0.attn_q.weight"], rank=2, seed=1)
    path = gf.write_lora(tmp_path / "other.gguf", lora, alpha=4.0, arch="gemma3")
    with pytest.raises(ConvertError, match="adapter is for gemma3"):
        to_peft.plan_peft([(path, 1.0)], smol_path)


def test_a_changed_adapter_file_is_not_exported(tmp_path, capsys):
    import shutil

    adapter = tmp_path / "p.gguf"
    shutil.copy(bundled_dir() / "pirate.gguf", adapter)
    write_role(tmp_path / "roles", "mine", adapter)
    with open(adapter, "r+b") as fh:  # one flipped byte in the weights after the role pinned the file
        fh.seek(-100, 2)
        byte = fh.read(1)
        fh.seek(-100, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "export"
    assert main(["export", "mine", "--to", str(out), "--role-dir", str(tmp_path / "roles")]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    assert not out.exists()
