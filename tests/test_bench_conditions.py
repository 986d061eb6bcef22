"""`edgelora bench` says what the machine was doing and leaves the user's data alone."""

from __future__ import annotations

import time

from edgelora.bench import _ask_first_output, print_table
from edgelora.bench_contention import MachineWatch, competing, not_idle_warning
from edgelora.history import History, default_db


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
