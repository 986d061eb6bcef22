"""`edgelora bench` says what the machine was doing and leaves the user's data alone."""

from __future__ import annotations

import subprocess
import sys
import time

from edgelora.bench.run import _ask_first_output, print_table
from edgelora.bench.contention import MachineWatch, competing, not_idle_warning
from edgelora.conversation.history import History, default_db


def test_the_ask_timing_does_not_write_to_the_chat_history(smol_path):
    assert _ask_first_output(smol_path) > 0
    if default_db().exists():
        assert History().list() == []  # `ask -c` would otherwise continue "Say hello."


def test_a_busy_machine_gets_a_one_line_warning_and_no_idle_label(smol_path):
    with competing("2", smol_path):
        watch = MachineWatch()
        time.sleep(1.0)
        machine = watch.finish()  # before they end: not yet counted as this process's own children
    assert machine["idle"] is False and machine["others_cpu"] >= 0.6
    warning = not_idle_warning("cpu", machine)
    assert warning.startswith("warning: the machine was not idle during cpu") and "\n" not in warning
    table = print_table({"machine": {"cpu": machine}})
    assert table.splitlines()[0] == warning
    assert "idle," not in table and "busy, load average" in table


def test_competing_processes_end_when_the_table_is_interrupted(smol_path):
    try:
        with competing("2", smol_path) as procs:
            assert all(p.poll() is None for p in procs)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert len(procs) == 2 and all(p.poll() is not None for p in procs)


def test_competing_processes_end_on_their_own_when_the_bench_is_killed(smol_path, tmp_path):
    """A bench killed outright runs no cleanup: its busy processes notice their parent is gone."""
    code = ("import os, sys\nfrom pathlib import Path\nfrom edgelora.bench.contention import competing\n"
            f"with competing('1', Path({str(smol_path)!r})) as procs:\n"
            f"    Path({str(tmp_path / 'pid')!r}).write_text(str(procs[0].pid))\n"
            "    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], timeout=60, check=True)
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended (its new parent reaps it)
