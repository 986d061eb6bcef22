"""Seeded, bounded fuzzing of every file a user can hand us: single-byte mutations of a real adapter
and of a base model's header, mutated role manifests and PEFT configs. Every case must end in a
clean accept or a typed, one-line error: no signal, no traceback, and the engine still answering.
Cases run in child processes (tests/fuzz_cases.py) so a native crash fails the test instead of
killing pytest; a crashed child is restarted after the case that killed it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edgelora.roles.manifest import bundled_dir

SEED = 20261123
COUNTS = {"adapter": 60, "base": 40, "manifest": 60, "peft": 40}


@pytest.fixture(scope="module")
def fuzz_src(tmp_path_factory, tiny):
    from edgelora.bench.run import write_synthetic_peft

    src = tmp_path_factory.mktemp("fuzz") / "src"
    src.mkdir()
    shutil.copy(bundled_dir() / "pirate.gguf", src / "pirate.gguf")
    shutil.copy(bundled_dir() / "pirate.toml", src / "pirate.toml")
    shutil.copy(tiny["base"], src / "tiny.gguf")
    write_synthetic_peft(src / "peft", tiny["base"], rank=2)
    return src


def run_kind(kind: str, work: Path, env: dict) -> tuple[list[dict], list[str]]:
    results, crashes, start = [], [], 0
    root = Path(__file__).resolve().parents[1]
    while start < COUNTS[kind]:
        proc = subprocess.run([sys.executable, "-m", "tests.fuzz_cases", kind, str(SEED), str(COUNTS[kind]), str(start),
                               str(work)], capture_output=True, text=True, timeout=300, cwd=root, env=env)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        results += lines
        if proc.returncode == 0:
            break
        started = int((work / "started").read_text())
        how = signal.Signals(-proc.returncode).name if proc.returncode < 0 else f"exit {proc.returncode}"
        crashes.append(f"{kind} case {started}: {how} {proc.stderr.strip().splitlines()[-1:] }")
        start = started + 1
    return results, crashes


@pytest.mark.parametrize("kind", list(COUNTS))
def test_fuzzed_inputs_end_in_accept_or_a_typed_error(kind, fuzz_src, tmp_path, isolated_home):
    work = tmp_path / "work"
    shutil.copytree(fuzz_src, work / "src")
    results, crashes = run_kind(kind, work, dict(os.environ))
    cases = [r for r in results if r["i"] >= 0]
    tally = Counter(r["outcome"] for r in cases)
    print(f"\n[fuzz] {kind}: {len(cases) + len(crashes)} cases: {dict(tally)}, crashed {len(crashes)}")
    assert not crashes, crashes
    assert not [r for r in cases if r["outcome"] == "traceback"], [r for r in cases if r["outcome"] == "traceback"]
    assert len(cases) == COUNTS[kind]
    assert tally["refused"] > 0  # the mutations do reach the checks
    if kind in ("adapter", "manifest"):
        assert [r for r in results if r["outcome"] == "engine" and r["detail"].strip()]  # still answering
