"""`edgelora bench --only cpu`: the contention table, and what the machine was doing meanwhile.

Generation speed for edgelora's default thread policy (thread_policy.py) and for each fixed thread
count, with 0, 1, 2 and 4 competing CPU-bound processes and with a second edgelora process
generating, all in one run. Variants alternate within each load level so background noise hits
them alike. Thread counts change between decodes (llama_set_n_threads), so every variant runs on
one engine in this process; each "default" run starts from a fresh policy, as `edgelora ask` does.

Competing processes end when the table ends or is interrupted (killed in ``finally``), and on their
own if this process dies (they watch their parent) or after a deadline.
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from edgelora.safety import cpu
from edgelora.runtime.thread_policy import LoadMeter, ThreadPolicy, _machine_busy_s

GEN_TOKENS = 48
CAP_S = 10.0  # a variant that collapses stops here; its rate is what it managed (4 busy processes: ~5 s to a first token)
PROMPT = "Describe a forest."
LIFETIME_S = 900  # no competitor outlives this, whatever happens to the bench
IDLE_OTHERS = 0.25  # cores other programs may use while the machine still counts as idle

_BUSY = ("import os, time\nparent, end = os.getppid(), time.monotonic() + {s}\n"
         "while time.monotonic() < end and os.getppid() == parent:\n    pass\n")
_GENERATOR = """
import os, sys, time
from edgelora import Engine
parent, end = os.getppid(), time.monotonic() + float(sys.argv[2])
eng = Engine(sys.argv[1], n_ctx=512)
print("ready", flush=True)
while time.monotonic() < end and os.getppid() == parent:
    eng.chat([{"role": "user", "content": "Write a long story about a lighthouse."}], max_tokens=64, temperature=0)
"""

LOADS = ("0", "1", "2", "4", "edgelora")


@contextmanager
def competing(load: str, model: Path):
    """``load`` busy processes (a digit) or a second edgelora generating ('edgelora')."""
    procs: list[subprocess.Popen] = []
    try:
        if load == "edgelora":
            p = subprocess.Popen([sys.executable, "-c", _GENERATOR, str(model), str(LIFETIME_S)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
            procs.append(p)
            ready, _, _ = select.select([p.stdout], [], [], 120)
            if not ready or p.stdout.readline().strip() != "ready":
                raise RuntimeError("the competing edgelora process did not start")
        else:
            for _ in range(int(load)):
                procs.append(subprocess.Popen([sys.executable, "-c", _BUSY.format(s=LIFETIME_S)], stdin=subprocess.DEVNULL))
        time.sleep(1.0 if procs else 0.0)  # let them reach full speed
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class MachineWatch:
    """Load average before and after a section, and how many cores other programs used during it
    (the machine's busy time minus this process's and its children's)."""

    def __init__(self):
        self.load_before = os.getloadavg()[0]
        self.busy0, self.own0, self.t0 = _machine_busy_s(), _own_cpu_s(), time.monotonic()

    def finish(self) -> dict:
        out = {"load_before": round(self.load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
        busy = _machine_busy_s()
        if busy is not None and self.busy0 is not None:
            wall = max(time.monotonic() - self.t0, 1e-3)
            out["others_cpu"] = round(max(0.0, (busy - self.busy0) - (_own_cpu_s() - self.own0)) / wall, 2)
        others = out.get("others_cpu", self.load_before)
        out["idle"] = others < IDLE_OTHERS
        return out


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def not_idle_warning(section: str, watch: dict) -> str | None:
    """One line when the machine was busy with other work during ``section``."""
    if watch["idle"]:
        return None
    used = f"other programs used {watch['others_cpu']:.2f} cores, " if "others_cpu" in watch else ""
    return (f"warning: the machine was not idle during {section} ({used}load average "
            f"{watch['load_before']:.2f} before, {watch['load_after']:.2f} after); its figures include that load")


def _rate(eng, policy: ThreadPolicy) -> float:
    eng.threads = policy
    timer = threading.Timer(CAP_S, eng.cancel)
    timer.start()
    try:
        out = eng.chat([{"role": "user", "content": PROMPT}], max_tokens=GEN_TOKENS, temperature=0)
    finally:
        timer.cancel()
    return out.completion_tokens / out.total_s if out.total_s else 0.0


def contention_table(model: Path, rounds: int, say: Callable[[str], None], loads=LOADS) -> dict:
    from edgelora.runtime.engine import Engine

    cores = cpu.default_threads()
    eng = Engine(model, n_ctx=1024)
    eng.reuse_prefix = False  # every run evaluates its prompt, as a new `ask` does
    adaptive_default = eng.threads
    variants: dict[str, Callable[[], ThreadPolicy]] = {
        "default": lambda: ThreadPolicy(cores, others=LoadMeter()),
        **{f"threads={n}": (lambda n=n: ThreadPolicy(cores, pinned=n, pinned_by="bench"))
           for n in ThreadPolicy(cores).candidates},
    }
    table: dict = {"cores": cores, "gen_tokens": GEN_TOKENS, "cap_s": CAP_S, "rounds": rounds, "rows": {}}
    try:
        eng.complete("warm up", max_tokens=2, temperature=0)
        for load in loads:
            say(f"CPU contention: {load} competing {'process' if load == 'edgelora' else 'busy processes'}...")
            watch = MachineWatch()
            runs: dict[str, list[float]] = {v: [] for v in variants}
            steps: dict[str, int] = {}  # generation steps the default policy ran at each count
            with competing(load, model):
                names = list(variants)
                for i in range(rounds):
                    for name in names[i % len(names):] + names[:i % len(names)]:  # rotated: no variant always first
                        policy = variants[name]()
                        time.sleep(LoadMeter.WINDOW_S)  # its first reading, as an engine's load time gives it
                        runs[name].append(_rate(eng, policy))
                        if name == "default":
                            for n, arm in policy.arms["generation"].items():
                                steps[str(n)] = steps.get(str(n), 0) + arm.steps
            row = {name: round(statistics.median(r), 2) for name, r in runs.items()}
            best = max((k for k in row if k != "default"), key=row.get)
            # Paired within each round (same background load), then the median: drifts cancel.
            paired = statistics.median(d / max(b, 1e-9) for d, b in zip(runs["default"], runs[best]))
            table["rows"][load] = {"tok_s": row, "best_fixed": best, "default_vs_best_fixed": round(paired, 3),
                                   "default_steps_by_threads": steps, "machine": watch.finish()}
    finally:
        eng.threads = adaptive_default
        eng.close()
    ratios = [r["default_vs_best_fixed"] for r in table["rows"].values()]
    table["worst_default_vs_best_fixed"] = min(ratios) if ratios else None
    return table


def contention_rows(t: dict) -> list[tuple[str, str]]:
    rows = [("contention: tok/s (default policy vs fixed threads)", f"{t['gen_tokens']} tokens, median of {t['rounds']}")]
    for load, r in t["rows"].items():
        m = r["machine"]
        name = "a second edgelora generating" if load == "edgelora" else f"{load} busy process{'es' if load != '1' else ''}"
        if load == "0":
            name += " (idle)" if m["idle"] else " (machine busy)"
        cells = ", ".join(f"{k} {v:.1f}" for k, v in r["tok_s"].items())
        rows.append((f"  {name}", f"{cells}; default/best fixed {r['default_vs_best_fixed']:.2f}x "
                                  f"(load {m['load_before']:.1f}->{m['load_after']:.1f})"))
    return rows
