"""`edgelora bundle` refusals (one line, exit 2, nothing left behind) and the target-side placing of
models and roles. The offline build-install-use run is tests/test_bundle_offline.py (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgelora.config import load_config
from edgelora.gguf_info import sha256_file
from edgelora.models import resolve_model
from edgelora.offline import place
from edgelora.roles import load_manifest
from edgelora.storage import install_role

from .conftest import write_role


def bundle_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgelora", "bundle", *args], capture_output=True, text=True,
                          timeout=120)


def one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("[")]  # "[  0.1 s] step" progress
    assert len(lines) == 1 and lines[0].startswith("edgelora: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def nothing_left(folder: Path, name: str):
    assert [p.name for p in folder.iterdir() if p.name.startswith(name)] == []


@pytest.mark.parametrize("value", ["2.7x", "3", "three", "3.11.2"])
def test_bad_python_version_is_refused(tmp_path, value):
    one_line_error(bundle_cli(str(tmp_path / "b"), "--python", value), "--python", value)
    nothing_left(tmp_path, "b")


def test_unknown_model_and_role_are_named(tmp_path):
    one_line_error(bundle_cli(str(tmp_path / "b"), "--model", str(tmp_path / "nope.gguf")), "--model", "nope.gguf")
    one_line_error(bundle_cli(str(tmp_path / "b"), "--role", "nosuchrole"), "--role", "nosuchrole")
    nothing_left(tmp_path, "b")


def test_an_adapter_is_not_a_base_model(tmp_path, smol_adapters):
    one_line_error(bundle_cli(str(tmp_path / "b"), "--model", str(smol_adapters["a"])), "--model", "adapter")


def test_existing_out_needs_force(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep me")
    one_line_error(bundle_cli(str(tmp_path / "b")), str(tmp_path / "b"), "--force")
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep me"


def test_missing_parent_folder_is_named(tmp_path):
    one_line_error(bundle_cli(str(tmp_path / "no" / "b")), str(tmp_path / "no"))


def test_role_with_a_wrong_pin_fails_before_any_download_and_leaves_nothing(tmp_path, isolated_home, smol_adapters):
    write_role(isolated_home / "roles", "broken", smol_adapters["a"], sha="0" * 64)
    proc = bundle_cli(str(tmp_path / "b.tar.gz"), "--role", "broken")
    line = one_line_error(proc, str(smol_adapters["a"]), "sha256")
    assert "fetching" not in proc.stderr and "building" not in proc.stderr, proc.stderr  # failed before the wheels
    nothing_left(tmp_path, "b")
    assert line


# ---------------------------------------------------------------- target side: place.py


def fake_bundle(tmp_path, model: Path, role_manifest: Path | None) -> Path:
    """A bundle's models/, roles/ and bundle.json, as build.py writes them (no wheels: place.py
    runs after pip)."""
    b = tmp_path / "bundle"
    (b / "models").mkdir(parents=True)
    shutil.copyfile(model, b / "models" / "tiny-llama.gguf")
    info = {"models": [{"name": "tiny-llama", "file": "models/tiny-llama.gguf", "sha256": sha256_file(model)}],
            "roles": {"bundled": ["pirate"], "user": []}}
    if role_manifest:
        install_role(load_manifest(role_manifest), b / "roles")
        info["roles"]["user"].append({"name": "mine", "manifest": "roles/mine.toml"})
    (b / "bundle.json").write_text(json.dumps(info))
    return b


def test_place_puts_models_and_roles_where_edgelora_finds_them(tmp_path, isolated_home, tiny, smol_adapters):
    src = write_role(tmp_path / "src", "mine", smol_adapters["a"])
    b = fake_bundle(tmp_path, tiny["base"], src)
    (isolated_home / "config.toml").write_text("threads = 2\n")
    lines = []
    place.place(b, out=lines.append)
    text = "\n".join(lines)
    dest = isolated_home / "models" / "tiny-llama.gguf"
    assert f"{dest} (placed; `-m tiny-llama`)" in text
    assert resolve_model("tiny-llama") == dest  # -m NAME finds it
    assert load_config().default_model == str(dest)  # no embedded default in the bundle: this one is
    assert load_config().threads == 2  # the user's settings kept
    role = load_manifest(isolated_home / "roles" / "mine.toml")
    assert sha256_file(role.adapters[0].file) == sha256_file(smol_adapters["a"])
    assert "pirate (bundled with edgelora" in text

    lines.clear()
    place.place(b, out=lines.append)  # re-run: upgrade in place
    text = "\n".join(lines)
    assert "(unchanged;" in text and "mine.toml (replaced)" in text
    assert "already sets default_model" in text


def test_place_refuses_a_model_that_changed_after_the_check(tmp_path, isolated_home, tiny):
    b = fake_bundle(tmp_path, tiny["base"], None)
    data = bytearray((b / "models" / "tiny-llama.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "models" / "tiny-llama.gguf").write_bytes(bytes(data))
    assert place.main([str(b)]) == 1
    assert not (isolated_home / "models" / "tiny-llama.gguf").exists()
    assert not any((isolated_home / "models").glob(".*tmp"))


def test_models_dir_does_not_shadow_a_real_path(tmp_path, isolated_home, tiny, monkeypatch):
    (isolated_home / "models").mkdir()
    shutil.copyfile(tiny["base"], isolated_home / "models" / "x.gguf")
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(tiny["merged1"], tmp_path / "x.gguf")
    assert resolve_model("x.gguf") == Path("x.gguf")  # a file here wins
    assert resolve_model("x") == isolated_home / "models" / "x.gguf"


def test_place_warns_when_this_cpu_lacks_what_the_build_cpu_had(tmp_path, isolated_home, tiny):
    b = fake_bundle(tmp_path, tiny["base"], None)
    info = json.loads((b / "bundle.json").read_text())
    here = place.cpu_flags()
    if here is None:
        pytest.skip("no /proc/cpuinfo flags on this OS")
    lines = []
    place.place(b, out=lines.append)  # no cpu_flags recorded: nothing to compare
    assert not any(l.startswith("warning") for l in lines)
    (b / "bundle.json").write_text(json.dumps({**info, "cpu_flags": here}))
    lines.clear()
    place.place(b, out=lines.append)
    assert not any(l.startswith("warning") for l in lines)  # same CPU
    (b / "bundle.json").write_text(json.dumps({**info, "cpu_flags": [*here, "avx9000"]}))
    lines.clear()
    place.place(b, out=lines.append)
    assert lines[0].startswith("warning") and "lacks avx9000," in lines[0] and "Illegal instruction" in lines[0]


def test_runtime_closure_follows_extras_and_markers_and_leaves_the_test_stack_out():
    from edgelora.offline.wheels import runtime_closure

    pins, missing = runtime_closure()
    names = {p.name for p in pins}
    assert {"edgelora", "llama-cpp-python", "numpy", "textual", "gguf", "tokenizers"} <= names
    assert "linkify-it-py" in names  # textual needs markdown-it-py[linkify]: an extra's own requirements
    assert not names & {"torch", "transformers", "peft", "pytest", "openai", "pipx"}  # [test] extras stay out
    assert missing == []
    pins_310, missing_310 = runtime_closure(python="3.10")
    assert "tomli>=2" in missing_310 or "tomli" in {p.name for p in pins_310}  # python_version < '3.11'
    assert "tomli" not in names or sys.version_info < (3, 11)


def test_the_source_copy_skips_bundles_inside_the_tree(tmp_path):
    from edgelora.offline.wheels import _ignore_source

    (tmp_path / "old-bundle").mkdir()
    for f in ("SHA256SUMS", "bundle.json"):
        (tmp_path / "old-bundle" / f).write_text("")
    (tmp_path / "edgelora").mkdir()
    names = ["old-bundle", "edgelora", ".venv", "b.tmp-abc123", "x.tar.gz", "pyproject.toml"]
    assert _ignore_source(str(tmp_path), names) == {"old-bundle", ".venv", "b.tmp-abc123", "x.tar.gz"}
