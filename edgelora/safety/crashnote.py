"""If llama.cpp kills the process (a native crash nobody foresaw), say so on the next run.

Each CLI run leaves a marker in the cache folder and points Python's faulthandler at a file beside
it; a clean exit removes both. A marker whose process is gone and whose fault file holds a fatal
error means the last run died natively: the next run prints one line saying what happened and how to
work around it, and stops trusting cached "extra buffers are safe" verdicts (cpu.py)."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import os
import re
import time
from pathlib import Path

from edgelora.config import cache_dir
from edgelora.convert.outputs import pid_alive


def _folder() -> Path:
    return cache_dir() / "runs"


def start(command: str) -> None:
    """Mark this run; quietly does nothing where the cache folder is not writable."""
    folder = _folder()
    marker = folder / f"{os.getpid()}.json"
    fault = marker.with_suffix(".fault")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"command": command, "started": time.time()}))
        stream = open(fault, "w")  # noqa: SIM115 - must stay open for faulthandler until exit
    except OSError:
        return
    faulthandler.enable(file=stream)

    def finish() -> None:
        faulthandler.disable()
        stream.close()
        for path in (marker, fault):
            with contextlib.suppress(OSError):
                path.unlink()

    atexit.register(finish)



def previous_crashes() -> list[str]:
    """One line per earlier run that died natively (each reported once)."""
    notes = []
    folder = _folder()
    for marker in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not marker.stem.isdigit() or pid_alive(int(marker.stem)) or int(marker.stem) == os.getpid():
            continue
        fault = marker.with_suffix(".fault")
        try:
            what = json.loads(marker.read_text()).get("command", "edgelora")
            text = fault.read_text(errors="replace") if fault.exists() else ""
        except (OSError, ValueError):
            what, text = "edgelora", ""
        found = re.search(r"Fatal Python error: ([^\n]+)", text)
        if found:
            notes.append(f"the previous run (`edgelora {what}`, pid {marker.stem}) was killed by a native crash "
                         f"in llama.cpp ({found.group(1).strip()})")
        for path in (marker, fault):  # kill -9 or a power cut leaves a marker with no fault: nothing to say
            with contextlib.suppress(OSError):
                path.unlink()
    return notes


def report_previous_crashes(echo) -> None:
    from edgelora.safety import cpu
    from edgelora.safety import gpu_adapters

    notes = previous_crashes()
    if not notes:
        return
    demoted = cpu.demote_after_crash("a previous run crashed natively with them on; set cpu_extra_buffers = \"on\" to retry")
    gpu_forgotten = gpu_adapters.forget_after_crash()
    for note in notes:
        fix = ("llama.cpp's extra CPU buffers are now off on this host; " if demoted else "") + (
            "adapters on a GPU device will be checked again before use; " if gpu_forgotten else "") + (
            f"if it happens again, set {cpu.ENV}=off (or cpu_extra_buffers = \"off\" in the config) "
            "and run with -v to see llama.cpp's log")
        echo(f"edgelora: note: {note}; {fix}")
