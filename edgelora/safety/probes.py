"""One runner for the child probes (cpu.py, gpu_adapters.py): run a child that may crash llama.cpp,
say what happened, the same way for every probe.

Only a signal a native bug kills a process with says "this host crashes here". SIGKILL (the
out-of-memory killer, kill -9), SIGTERM or SIGINT come from outside, and a timeout or an ordinary
failure (a file llama.cpp cannot load) says nothing about the host either: no verdict is kept."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass

# What a native bug kills a process with.
CRASH_SIGNALS = frozenset(s.value for s in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL,
                                            signal.SIGFPE, signal.SIGTRAP))


@dataclass
class ChildResult:
    """``outcome``: 'ok' (exit 0 and printed 'ok'), 'crashed' (a crash signal), 'killed' (another
    signal, from outside), 'timeout', or 'failed' (an ordinary error exit). ``detail``: the signal's
    name, or the last line of the child's stderr."""

    outcome: str
    detail: str
    seconds: float

    @property
    def verdict(self) -> bool | None:
        """True: safe here; False: crashes here; None: this run decides nothing for later ones."""
        return {"ok": True, "crashed": False}.get(self.outcome)


def run_child(argv: list[str], timeout: float, env: dict | None = None) -> ChildResult:
    t0 = time.perf_counter()
    try:
        child = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return ChildResult("timeout", f"timed out after {timeout:g} s", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    code = child.returncode
    if code == 0 and child.stdout.strip().endswith(b"ok"):
        return ChildResult("ok", "", seconds)
    if code < 0:
        name = _signal_name(-code)
        return ChildResult("crashed" if -code in CRASH_SIGNALS else "killed", name, seconds)
    tail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {code}"]
    return ChildResult("failed", tail[0][:160], seconds)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
