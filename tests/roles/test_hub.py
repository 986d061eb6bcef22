"""Pulling from the Hugging Face Hub, offline against a cache folder the test builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from ..convert.test_convert_refusals import make_peft

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache, repo: str):
    """A snapshot in huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/REV/}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    return snap


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)


def test_pull_peft_adapter_converts_caches_and_makes_a_role(isolated_home, tmp_path):
    snap = hub_repo(isolated_home / "hf-cache", "someone/tiny-lora")
    make_peft(snap)
    first = run_cli("adapters", "pull", "someone/tiny-lora")
    assert first.returncode == 0, first.stderr
    assert (isolated_home / "roles" / "tiny-lora.toml").exists()
    second = run_cli("adapters", "pull", "someone/tiny-lora", "--name", "again")
    assert second.returncode == 0, second.stderr
    assert len(list((isolated_home / "cache" / "converted").glob("*.gguf"))) == 1  # converted once
    listed = json.loads(run_cli("roles", "list", "--json").stdout)
    assert {"tiny-lora", "again"} <= {r["name"] for r in listed["roles"]}
    answer = run_cli("ask", "hi", "--role", "tiny-lora", "--json", "--max-tokens", "3")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["adapters"][0]["name"] == "tiny-lora"
    dup = run_cli("adapters", "pull", "someone/tiny-lora")
    assert dup.returncode == 2 and "already exists" in dup.stderr


def test_pull_gguf_adapter_is_validated(isolated_home, smol_adapters):
    good = hub_repo(isolated_home / "hf-cache", "someone/gguf-lora")
    shutil.copy(smol_adapters["a"], good / "a.gguf")
    assert run_cli("adapters", "pull", "someone/gguf-lora").returncode == 0
    bad = hub_repo(isolated_home / "hf-cache", "someone/bad-lora")
    (bad / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00junk")
    result = run_cli("adapters", "pull", "someone/bad-lora")
    assert result.returncode == 2 and "x.gguf" in result.stderr
    assert not (isolated_home / "roles" / "bad-lora.toml").exists()


def test_pull_model_from_cache_and_offline_miss(isolated_home, smol_path):
    snap = hub_repo(isolated_home / "hf-cache", "someone/tiny-model")
    os.symlink(smol_path, snap / "model.gguf")
    result = run_cli("models", "pull", "someone/tiny-model", "model.gguf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("model: ") and "edgelora ask -m model" in result.stdout  # a short name
    listed = json.loads(run_cli("models", "list", "--json").stdout)
    assert {r["name"]: r["path"] for r in listed}["model"] == str(isolated_home / "models" / "model.gguf")
    assert run_cli("ask", "-m", "model", "hi", "--max-tokens", "2", "--no-log").returncode == 0
    removed = run_cli("models", "rm", "model", "--yes")
    assert removed.returncode == 0 and not (isolated_home / "models" / "model.gguf").exists()
    assert smol_path.exists()  # the short name went, never a file outside the Hub cache
    missing = run_cli("models", "pull", "someone/not-cached", "model.gguf")
    assert missing.returncode == 2 and "cannot pull someone/not-cached" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
