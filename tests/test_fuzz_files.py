"""Seeded, bounded fuzzing of the commands that write user files (`history export -o`, `export --to`,
`adapters sign`, `adapters keygen`, `convert -o`) against generated hostile targets: FIFOs, device
nodes, the base model, symlinks (to the base, dangling, looping), foreign files and folders, missing
parents, names too long. Every case must exit 0 or 2 (2 with one line on stderr), never hang or show a
traceback, and leave every file that was there before unchanged. Cases run in one child process
(tests/fuzz_files_cases.py) with an alarm per case, so a command that blocks fails the test instead
of hanging it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

SEED = 20261124
CASES = 60


def test_hostile_output_targets_are_refused_in_one_line_and_destroy_nothing(tmp_path, tiny, isolated_home):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_files_cases", str(SEED), str(CASES), str(tmp_path / "work"),
                           str(tiny["base"])], capture_output=True, text=True, timeout=600, cwd=root, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    bad = [c for c in cases if c["outcome"] not in ("ok", "refused")]
    tally = Counter(c["outcome"] for c in cases)
    print(f"\n[fuzz-files] {len(cases)} cases: {dict(tally)}; by command: {dict(Counter(c['command'] for c in cases))}")
    assert len(cases) == CASES
    assert not bad, "\n".join(f"{c['command']} {c['slot']}={c['kind']}{' --force' if c['force'] else ''}: "
                              f"{c['outcome']} {c['changed']} {c['stderr'][-300:]!r}" for c in bad)
    assert tally["refused"] > CASES // 2  # the hostile targets do reach the checks
