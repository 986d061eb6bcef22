"""One runner for the child probes: which deaths mean "this host crashes here", the same for the CPU
probe (extra buffer types) and the GPU adapter probe. Children here are stand-ins that die on purpose,
so the classification is checked on any host, with or without a GPU."""

from __future__ import annotations

import signal
import sys

import pytest

from edgelora.safety import cpu, gpu_adapters, probes


def dies_with(sig: signal.Signals) -> list[str]:
    return [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), signal.{sig.name})"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.delenv(gpu_adapters.ENV, raising=False)


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE])
def test_a_native_crash_signal_is_a_verdict_that_this_host_crashes(sig):
    result = probes.run_child(dies_with(sig), timeout=60)
    assert (result.outcome, result.detail, result.verdict) == ("crashed", sig.name, False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_kill_from_outside_decides_nothing(sig):
    """SIGKILL is what the out-of-memory killer sends: the host did not crash, the machine was full."""
    result = probes.run_child(dies_with(sig), timeout=60)
    assert (result.outcome, result.verdict) == ("killed", None) and sig.name in result.detail


def test_a_clean_child_a_failing_one_and_a_slow_one():
    assert probes.run_child([sys.executable, "-c", "print('ok')"], timeout=60).verdict is True
    failed = probes.run_child([sys.executable, "-c", "raise SystemExit('cannot load x.gguf')"], timeout=60)
    assert (failed.outcome, failed.detail, failed.verdict) == ("failed", "cannot load x.gguf", None)
    slow = probes.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert (slow.outcome, slow.verdict) == ("timeout", None) and slow.seconds < 10


def test_the_cpu_probe_killed_by_the_oom_killer_keeps_no_verdict(own_cache, monkeypatch, tmp_path):
    """The CPU probe used to count a SIGKILL as a crash, and remembered 'extra buffers crash here' for good."""
    monkeypatch.setattr(cpu, "probe_argv", lambda path: dies_with(signal.SIGKILL))
    path = cpu.decide(tmp_path / "m.gguf", "auto", file_type=3)
    assert path.extra_buffers is False and "SIGKILL" in path.reason and "off for this run" in path.reason
    assert not cpu.STORE.path.exists()  # the next run probes again


def test_both_probes_classify_a_death_the_same_way(own_cache, monkeypatch, tmp_path):
    for sig, verdict in ((signal.SIGSEGV, False), (signal.SIGKILL, None)):
        monkeypatch.setattr(cpu, "probe_argv", lambda *a, s=sig: dies_with(s))
        monkeypatch.setattr(gpu_adapters, "probe_argv", lambda *a, s=sig: dies_with(s))
        cpu_safe, cpu_reason, _ = cpu.run_probe(tmp_path / "m.gguf")
        gpu_safe, gpu_reason, _ = gpu_adapters.run_probe(tmp_path / "m.gguf", 99, tmp_path / "a.gguf")
        assert cpu_safe is gpu_safe is verdict, (sig, cpu_reason, gpu_reason)
        assert sig.name in cpu_reason and sig.name in gpu_reason


def test_the_gpu_probe_child_loads_the_model_the_way_the_engine_did(own_cache, monkeypatch, tmp_path):
    """The child reads the CPU path from the environment the runner gives it."""
    seen = tmp_path / "seen"
    code = f"import os; open({str(seen)!r}, 'w').write(os.environ.get({cpu.ENV!r}, '')); print('ok')"
    monkeypatch.setattr(gpu_adapters, "probe_argv", lambda *a: [sys.executable, "-c", code])
    safe, _, _ = gpu_adapters.run_probe(tmp_path / "m.gguf", 99, tmp_path / "a.gguf", extra_buffers=False)
    assert safe is True and seen.read_text() == "off"


def test_the_real_adapter_probe_children_switch_and_decode(own_cache, smol_path, smol_adapters):
    """The children run the handle's switch path for real (on the CPU here: no device needed to run them)."""
    safe, reason, seconds = gpu_adapters.run_probe(smol_path, 0, smol_adapters["a"], extra_buffers=False)
    assert safe is True, reason
    assert f"{gpu_adapters.PROBE_CHILDREN} child processes" in reason and seconds < gpu_adapters.PROBE_TIMEOUT_S
