"""The adaptive thread policy: fewer threads when other programs compete for the cores, all cores
back when they stop; a count the user pinned is never changed (README 'Threads on a busy machine')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from edgelora.runtime.thread_policy import LoadMeter, ThreadPolicy


class FakeMachine:
    """A 2-core machine: a clock, the CPU other programs use, and how long a decode takes."""

    def __init__(self):
        self.now = 0.0
        self.others = 0.0

    def clock(self) -> float:
        return self.now

    def step_s(self, threads: int) -> float:
        if self.others == 0:
            return 0.010 / threads  # idle: 2 threads twice as fast
        return 0.020 if threads == 1 else 0.500  # contended: 2 threads wait at every barrier

    def run(self, policy: ThreadPolicy, n_steps: int, kind: str = "generation") -> list[int]:
        used = []
        for _ in range(n_steps):
            n = policy.choose(kind)
            seconds = self.step_s(n)
            self.now += seconds
            policy.observe(kind, n, seconds)
            used.append(n)
        return used


def adaptive(machine: FakeMachine) -> ThreadPolicy:
    return ThreadPolicy(2, clock=machine.clock, others=lambda: machine.others)


def test_idle_machine_uses_every_core():
    m = FakeMachine()
    used = m.run(adaptive(m), 200)
    assert used[0] == 2
    assert used.count(2) >= 0.95 * len(used)  # re-checking 1 thread now and then is all it costs


def test_competing_program_moves_generation_to_fewer_threads_and_idle_brings_all_cores_back():
    m, policy = FakeMachine(), None
    policy = adaptive(m)
    assert set(m.run(policy, 50)[-40:]) == {2}  # after one look at 1 thread
    m.others = 1.0  # a build starts on one core
    contended = m.run(policy, 300)
    assert contended[0] == 1  # the very next decode: no slow 2-thread step first
    assert set(contended) == {1}
    m.others = 0.0  # the build ends
    recovered = m.run(policy, 300)
    assert recovered[-1] == 2
    assert recovered.count(2) >= 0.9 * len(recovered)


def test_slow_steps_alone_move_to_fewer_threads_when_the_load_reading_is_unavailable():
    """Without /proc/stat (not Linux) the step times decide; a slow count is re-tried rarely."""
    m = FakeMachine()
    policy = ThreadPolicy(2, clock=m.clock, others=lambda: None)
    m.run(policy, 20)
    m.others = 1.0  # the policy cannot see it: only the steps get slower
    start = m.now
    used = m.run(policy, 600)
    assert used[-100:].count(1) >= 95
    retries = used.count(2) - 1  # the first slow step is how it finds out
    assert 0 < retries * 0.5 <= 0.06 * (m.now - start)  # re-checks cost a few percent of the time
    m.others = 0.0
    assert m.run(policy, 2000)[-100:].count(2) >= 90


def test_prompt_batches_and_generation_are_decided_separately():
    m = FakeMachine()
    policy = adaptive(m)
    m.run(policy, 30, "generation")
    m.run(policy, 3, "prompt")
    assert policy.arms["generation"][2].steps >= 25
    assert policy.arms["prompt"][2].steps >= 1 and policy.arms["prompt"][2].steps <= 3
    report = policy.report()
    assert report["policy"] == "adaptive" and report["generation"] == 2 and report["prompt"] == 2


def test_a_pinned_count_is_never_changed_whatever_the_load():
    m = FakeMachine()
    policy = ThreadPolicy(2, pinned=2, pinned_by="threads argument", clock=m.clock, others=lambda: m.others)
    m.others = 2.0
    assert set(m.run(policy, 50)) == {2}
    assert policy.report() == {"policy": "fixed", "cores": 2, "candidates": [2], "generation": 2, "prompt": 2,
                               "pinned_by": "threads argument"}


def test_load_meter_sees_a_core_taken_at_once_and_a_core_freed_only_after_a_second():
    clock, counters = [0.0], [0.0, 0.0]  # (machine busy seconds, own CPU seconds)
    meter = LoadMeter(clock=lambda: clock[0], read=lambda: tuple(counters))

    def window(others: float, own: float = 1.0, seconds: float = LoadMeter.WINDOW_S) -> float | None:
        clock[0] += seconds
        counters[0] += (others + own) * seconds
        counters[1] += own * seconds
        return meter()

    assert window(1.0, seconds=0.1) == pytest.approx(1.0)  # the first answer comes before a full window
    assert window(0.0) == pytest.approx(1.0)
    assert [round(window(0.0), 2) for _ in range(4)] == [1.0, 1.0, 1.0, 0.0]
    assert window(1.0) == pytest.approx(1.0)  # a build starts: seen in the next window
    assert [round(window(0.0), 2) for _ in range(5)] == [1.0, 1.0, 1.0, 1.0, 0.0]  # free for a second


def test_load_meter_sees_a_competing_busy_process():
    meter = LoadMeter()
    if meter() is None and meter._last is None:
        pytest.skip("no /proc/stat here")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"])
    try:
        time.sleep(0.5)
        LoadMeter()  # discard
        meter = LoadMeter()
        time.sleep(1.0)
        assert meter() >= 0.6  # the busy loop's core (generous: background load only adds)
    finally:
        busy.kill()
        busy.wait()


# ---------------------------------------------------------------------------- through the real engine and CLI


@pytest.fixture
def two_busy_processes():
    """Two CPU-bound processes on this process's cores: other programs fill at least one core."""
    cores = sorted(os.sched_getaffinity(0))
    code = ("import os, time\nos.sched_setaffinity(0, {cores})\nend = time.monotonic() + 60\n"
            "while time.monotonic() < end: pass\n").format(cores=set(cores))
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    time.sleep(0.5)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) != 2, reason="needs Linux, 2 cores")
def test_engine_generates_with_one_thread_while_other_programs_fill_a_core(engine, two_busy_processes):
    shared, engine.threads = engine.threads, ThreadPolicy(2, others=LoadMeter())  # fresh, as a new process's
    try:
        time.sleep(LoadMeter.WINDOW_S)
        engine.chat([{"role": "user", "content": "Describe a forest."}], max_tokens=8, temperature=0)
        report = engine.threads.report()
    finally:
        engine.threads = shared
    assert report["policy"] == "adaptive"
    assert report["other_programs_cpu"] >= 0.6
    assert report["generation"] == 1 and report["prompt"] == 1
    assert set(report["steps"]["generation"]) == {"1"}  # not one slow 2-thread step first


def test_ask_json_reports_the_thread_policy_and_a_pinned_count_is_kept(isolated_home):
    from click.testing import CliRunner

    from edgelora.frontends.cli.main import cli

    def ask(*args):
        result = CliRunner().invoke(cli, ["ask", "--json", "--no-log", "--temperature", "0", "--max-tokens", "4", *args, "Hi."])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["threads"]

    adaptive = ask()
    assert adaptive["policy"] == "adaptive" and adaptive["candidates"][0] == 1
    assert adaptive["generation"] in adaptive["candidates"]
    assert ask("--threads", "1") == {"policy": "fixed", "cores": adaptive["cores"], "candidates": [1],
                                     "generation": 1, "prompt": 1, "pinned_by": "threads argument"}
    (isolated_home / "config.toml").write_text("threads = 1\n")
    assert ask()["pinned_by"] == "config threads"


def test_doctor_shows_the_thread_policy_and_what_it_would_pick_now():
    from click.testing import CliRunner

    from edgelora.frontends.cli.main import cli

    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["cpu"]
    assert report["thread_policy"].startswith("adaptive 1-")
    n, _, cores = report["thread_policy_now"].partition(" of ")
    assert 1 <= int(n) <= int(cores.split()[0])
