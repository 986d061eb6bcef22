"""What a newcomer found outside the chat app: roles, signatures, history, models, the Hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from edgelora.files import sha256_file
from edgelora.models.catalog import catalog, resolve_model

from .conftest import write_role


def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_sign_then_add_works_when_nobody_asked_for_signatures(isolated_home, smol_adapters, tmp_path):
    adapter = shutil.copy(smol_adapters["a"], tmp_path / "x.gguf")
    assert run("adapters", "keygen", str(tmp_path / "k.pem")).returncode == 0
    assert run("adapters", "sign", str(adapter), "--key", str(tmp_path / "k.pem")).returncode == 0
    manifest = write_role(tmp_path, "my-role", tmp_path / "x.gguf")
    added = run("roles", "add", str(manifest))
    assert added.returncode == 0, added.stderr
    (isolated_home / "config.toml").write_text("require_signatures = true\n")
    refused = run("ask", "--role", "my-role", "hi", "--no-log")
    assert refused.returncode == 2 and "trusted_keys" in refused.stderr and "keygen" in refused.stderr


def test_a_manifest_path_wins_over_a_catalog_role_of_the_same_name(isolated_home, smol_adapters, tmp_path):
    manifest = write_role(tmp_path, "dup", smol_adapters["a"])
    assert run("roles", "add", str(manifest)).returncode == 0
    asked = run("ask", "--role", str(manifest), "hi", "--max-tokens", "2", "--no-log", "--json", "-v")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["role"] == "dup" and "shadows" in asked.stderr


def test_continue_keeps_the_conversation_s_role(isolated_home):
    first = run("ask", "--role", "pirate", "What is the moon?", "--max-tokens", "4", "--json")
    assert json.loads(first.stdout)["role"] == "pirate"
    again = json.loads(run("ask", "-c", "And the sun?", "--max-tokens", "4", "--json").stdout)
    assert again["role"] == "pirate" and again["conversation"] == json.loads(first.stdout)["conversation"]
    other = json.loads(run("ask", "-c", "--role", "terse", "And stars?", "--max-tokens", "4", "--json").stdout)
    assert other["role"] == "terse"


def test_duplicate_roles_and_out_of_range_scales_are_refused(smol_adapters):
    dup = run("ask", "--role", "pirate", "--role", "pirate", "hi", "--no-log")
    assert dup.returncode == 2 and "given twice" in dup.stderr
    neg = run("ask", "--adapter", f"{smol_adapters['a']}:-5", "hi", "--no-log")
    assert neg.returncode == 2 and "scale must be a number from -4 to 4" in neg.stderr
    ok = run("ask", "--adapter", f"{smol_adapters['a']}:-0.5", "hi", "--no-log", "--max-tokens", "2")
    assert ok.returncode == 0, ok.stderr  # negatives subtract an adapter: allowed within the range


def test_adapters_verify_reports_a_role_defined_twice(isolated_home, smol_adapters, tmp_path):
    extra = tmp_path / "extra"
    write_role(extra, "twice", smol_adapters["a"])
    write_role(isolated_home / "roles", "twice", smol_adapters["b"])
    (isolated_home / "config.toml").write_text(f'roles_dirs = ["{extra}"]\n')
    verify = run("adapters", "verify", "--json")
    assert verify.returncode == 2
    rows = json.loads(verify.stdout)
    assert len([r for r in rows if r["role"] == "twice"]) == 2 and all("more than once" in r["status"] for r in rows if r["role"] == "twice")


def test_ctrl_c_before_the_first_token_stops_fast_and_keeps_the_prompt(isolated_home):
    import signal

    long = "The history of ships and the sea. " * 300
    proc = subprocess.Popen([sys.executable, "-m", "edgelora", "ask", long, "--ctx", "4096", "--max-tokens", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # loaded, evaluating the ~2,700-token prompt
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - t0 < 1.5
    listed = run("history", "list")
    assert "The history of ships" in listed.stdout


def test_a_catalog_model_from_an_installed_package_is_found(isolated_home):
    path = resolve_model("gemma3-270m")  # the test extra installs its package
    assert path.is_file() and sha256_file(path) == catalog()["gemma3-270m"].sha256


def test_edgelora_model_variable_is_named_in_errors():
    r = run("ask", "hi", "--no-log", env={"EDGELORA_MODEL": "/nope.gguf"})
    assert r.returncode == 2 and "EDGELORA_MODEL=/nope.gguf" in r.stderr


def test_hub_with_no_network_fails_fast_with_one_line(isolated_home):
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: no network
    for args in (["models", "pull", "someone/repo", "x.gguf"], ["adapters", "pull", "someone/peft"]):
        t0 = time.monotonic()
        r = run(*args, env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot reach the Hugging Face Hub" in r.stderr
        assert time.monotonic() - t0 < 10
    t0 = time.monotonic()
    offline = run("models", "pull", "someone/repo", "x.gguf", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and time.monotonic() - t0 < 10


def test_truncated_adapter_says_how_many_bytes_are_missing(smol_adapters, tmp_path):
    data = smol_adapters["a"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    r = run("ask", "--adapter", str(cut), "hi", "--no-log")
    assert r.returncode == 2 and "truncated or corrupted: tensor" in r.stderr and "the file has" in r.stderr
