"""How many CPU threads each llama.cpp decode uses, decided while generating.

llama.cpp's threads meet at a barrier after every graph node. When another program holds a core,
the OS deschedules one of our threads and the others wait for it at every barrier: on 2 cores a
2-thread step then takes 10-100x longer than a 1-thread one (README 'Threads on a busy machine').
On an idle machine all cores are about 2x faster than one. So the count is chosen per decode:

- *room*: how many cores other programs used lately (``LoadMeter``: the machine's busy time from
  /proc/stat minus this process's own CPU time). A count that needs a core someone else is using
  is not tried: one slow step can cost seconds, so the gate stops it before it happens;
- *speed*: among the counts that fit, the one whose recent steps were fastest per token, measured
  separately for generation (one token per decode) and prompt batches;
- *re-checks*: evidence goes stale (``STALE_S``, and never sooner than ``RETRY_COST`` times what a
  step of that count last cost), so a count is re-tried now and then and all cores come back when
  the machine is idle again.

The state lives as long as the engine (the TUI and the server keep theirs across turns).
A count the user pinned (``--threads``, config ``threads``) is used as is: ``ThreadPolicy(pinned=n)``.
``ThreadPolicy`` is pure: fed step durations, it answers the next count; the clock and the load
reading are injectable so tests drive it without a model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("generation", "prompt")
STALE_S = 5.0  # older evidence is re-checked (cheap when the count is fast, see RETRY_COST)
RETRY_COST = 20.0  # a count is re-tried no sooner than 20x its last step cost: re-checks cost <= ~5%
SMOOTHING = 0.3  # weight of a new step in a count's running estimate
SLACK = 0.4  # other programs using less than this much of a core leave it to us


@dataclass
class Arm:
    """What one thread count gave lately for one kind of decode."""

    per_token_s: float | None = None
    tried_at: float = -math.inf
    steps: int = 0


def candidate_counts(cores: int) -> list[int]:
    """1, every core, and a few counts between (2 cores: [1, 2])."""
    return sorted({1, max(1, cores // 4), max(1, cores // 2), max(1, cores - 1), cores})


class ThreadPolicy:
    def __init__(self, cores: int, *, pinned: int | None = None, pinned_by: str = "",
                 clock: Callable[[], float] = time.perf_counter,
                 others: Callable[[], float | None] | None = None):
        """``others()``: CPU cores other programs use now (None: unknown, no gate)."""
        self.cores = max(1, cores)
        self.pinned = pinned
        self.pinned_by = pinned_by
        self.clock = clock
        self.others = others or (lambda: None)
        self.candidates = [pinned] if pinned else candidate_counts(self.cores)
        self.arms = {kind: {n: Arm() for n in self.candidates} for kind in KINDS}
        self.chosen = {kind: self.candidates[-1] for kind in KINDS}
        self.last_others: float | None = None

    @property
    def mode(self) -> str:
        return "fixed" if self.pinned else "adaptive"

    @property
    def initial(self) -> int:
        """The count the context is created with (every decode sets its own afterwards)."""
        return self.pinned or self.cores

    def room(self) -> int:
        """The most threads that fit beside what other programs use now."""
        self.last_others = self.others()
        if self.last_others is None:
            return self.cores
        return max(1, self.cores - math.ceil(self.last_others - SLACK))

    def choose(self, kind: str, n_tokens: int = 1) -> int:
        """The thread count for the next decode of ``kind`` holding ``n_tokens`` tokens."""
        if self.pinned:
            return self.pinned
        now, room = self.clock(), self.room()
        arms = self.arms[kind]
        fits = [n for n in self.candidates if n <= room]
        stale = [n for n in fits if self._stale(arms[n], now, n_tokens)]
        if stale:  # unknown or old evidence: the largest such count first (idle machines want all cores)
            pick = stale[-1]
        else:
            pick = min(fits, key=lambda n: (arms[n].per_token_s, -n))
        self.chosen[kind] = pick
        return pick

    def _stale(self, arm: Arm, now: float, n_tokens: int) -> bool:
        if arm.per_token_s is None:
            return True
        wait = max(STALE_S, RETRY_COST * arm.per_token_s * n_tokens)
        return now - arm.tried_at >= wait

    def observe(self, kind: str, threads: int, seconds: float, n_tokens: int = 1) -> None:
        """A decode of ``kind`` with ``threads`` threads took ``seconds`` for ``n_tokens`` tokens."""
        arm = self.arms[kind].get(threads)
        if arm is None or n_tokens < 1:
            return
        now = self.clock()
        x = max(seconds, 0.0) / n_tokens
        fresh = arm.per_token_s is None or now - arm.tried_at >= STALE_S
        arm.per_token_s = x if fresh else (1 - SMOOTHING) * arm.per_token_s + SMOOTHING * x
        arm.tried_at = now
        arm.steps += 1

    def report(self) -> dict:
        """What the policy is and what it chose (ask --json 'threads', doctor)."""
        out = {"policy": self.mode, "cores": self.cores, "candidates": list(self.candidates),
               "generation": self.chosen["generation"], "prompt": self.chosen["prompt"]}
        if self.pinned:
            out["pinned_by"] = self.pinned_by
            return out
        out["other_programs_cpu"] = None if self.last_others is None else round(self.last_others, 2)
        out["steps"] = {kind: {str(n): a.steps for n, a in arms.items() if a.steps} for kind, arms in self.arms.items()}
        return out

    def label(self) -> str:
        if self.pinned:
            return f"fixed {self.pinned} ({self.pinned_by})"
        return f"adaptive 1-{self.cores} threads, by other programs' CPU use and step times"


class LoadMeter:
    """CPU cores other programs used lately: the machine's busy time (/proc/stat, steal included: a
    hypervisor's other guests compete too) minus this process's own CPU time, per 0.25 s window.
    It answers the highest of the last second's windows: a core taken is seen at once, a core freed
    only once it stayed free for a second (a single quiet window between a build's jobs is not room)."""

    WINDOW_S = 0.25  # /proc/stat counts in 10 ms ticks: shorter windows are mostly rounding
    FIRST_S = 0.05  # but the first reading must not wait: a model can load faster than a window
    HOLD_S = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 read: Callable[[], tuple[float, float] | None] | None = None):
        """``read()``: (machine busy seconds, own CPU seconds) since some fixed point; None: unknown."""
        self.clock = clock
        self.read = read or _busy_and_own_s
        self.recent: list[tuple[float, float]] = []  # (end of window, others' cores in it)
        self._last = self._sample()

    def _sample(self):
        counters = self.read()
        return None if counters is None else (self.clock(), *counters)

    def __call__(self) -> float | None:
        if self._last is None:
            return None
        t, busy, own = self._last
        now = self.clock()
        if now - t >= (self.WINDOW_S if self.recent else self.FIRST_S):
            sample = self._sample()
            if sample is not None:
                self._last = sample
                self.recent.append((now, max(0.0, ((sample[1] - busy) - (sample[2] - own)) / (now - t))))
        self.recent = [(at, v) for at, v in self.recent if now - at <= self.HOLD_S] or self.recent[-1:]
        return max((v for _, v in self.recent), default=None)

    @property
    def value(self) -> float | None:
        return self.recent[-1][1] if self.recent else None


def _busy_and_own_s() -> tuple[float, float] | None:
    busy = _machine_busy_s()
    return None if busy is None else (busy, time.process_time())


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float | None:
    """Seconds all CPUs spent not idle since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def for_engine(n_threads: int | None, pinned_by: str = "threads setting") -> ThreadPolicy:
    """The policy an Engine uses: a count its caller pinned (``--threads``, config ``threads``, an
    argument; the front end reads the config), else adaptive."""
    from edgelora.safety import cpu

    cores = cpu.default_threads()
    if n_threads is not None:
        return ThreadPolicy(cores, pinned=cpu.check_threads(n_threads), pinned_by=pinned_by)
    return ThreadPolicy(cores, others=LoadMeter())


def doctor_report(n_threads: int | None = None) -> dict:
    """`edgelora doctor`: the policy (``n_threads``: a count the config pins), and the count it would
    pick for generation now."""
    policy = for_engine(n_threads, "config threads")
    if policy.pinned:
        return {"thread_policy": policy.label(), "thread_policy_now": f"{policy.pinned} threads"}
    time.sleep(LoadMeter.WINDOW_S)  # one reading of what other programs use
    n = policy.choose("generation")
    others = policy.last_others
    seen = "" if others is None else f" (other programs use {others:.2f} cores)"
    return {"thread_policy": policy.label(), "thread_policy_now": f"{n} of {policy.cores} threads{seen}"}
