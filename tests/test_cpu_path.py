"""The CPU kernel path: no host on which a chat prompt crashes (issue: AMX segfault).

Some hosts of this machine kind report AMX and llama.cpp's AMX matmul segfaults there on any
multi-token decode. The engine decides in a child process whether llama.cpp's extra buffer types are
safe; these tests check the real decision on this host and the fallback, forced, on any host."""

import json
import os
import signal
import subprocess
import sys

import pytest

from edgelora import Engine

from edgelora.safety import cpu
from edgelora.errors import EdgeloraError

from .conftest import GREEDY

# 30+ tokens once templated: a batch this size is what crashed on AMX hosts (Engine().complete("hi") did not)
CHAT_PROMPT = "Please explain in two plain sentences why the sky looks blue in the day and red at sunset."
CRASHING_PROBE = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


def cli(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache folder with no probe verdict yet: the next engine probes for real."""
    monkeypatch.setenv("EDGELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(cpu.ENV, raising=False)
    return tmp_path / "cache"


def test_chat_prompt_through_the_real_cli_answers_on_this_host(own_cache):
    """The check that would have caught the AMX crash: probe, load and a 30-token chat prompt."""
    result = cli("ask", CHAT_PROMPT, "--temperature", "0", "--max-tokens", "12", "--no-log", "--json",
                 env={"EDGELORA_CACHE_DIR": str(own_cache)})
    assert result.returncode == 0, result.stderr[-500:]
    out = json.loads(result.stdout)
    assert out["usage"]["prompt_tokens"] >= 30 and out["text"].strip()
    assert "llama_" not in result.stderr and "ggml_" not in result.stderr  # nothing native without -v
    verdicts = json.loads((own_cache / "cpu-probe.json").read_text())
    assert len(verdicts) == 1 and isinstance(next(iter(verdicts.values()))["extra_buffers"], bool)


def test_a_crashing_probe_makes_the_engine_take_the_safe_path(own_cache, monkeypatch, smol_path):
    monkeypatch.setattr(cpu, "probe_argv", lambda path: CRASHING_PROBE)
    with Engine(smol_path, n_ctx=512) as eng:
        assert eng.cpu_path.extra_buffers is False
        assert eng.cpu_path.source == "probe" and "SIGSEGV" in eng.cpu_path.reason
        assert eng.llama.model_params.use_extra_bufts is False  # what llama.cpp was really given
        out = eng.chat([{"role": "user", "content": CHAT_PROMPT}], max_tokens=8, **GREEDY)
        assert out.prompt_tokens >= 30 and out.completion_tokens > 0

    # remembered: the next engine does not probe again, and doctor says which path and why
    monkeypatch.setattr(cpu, "probe_argv", lambda path: pytest.fail("probed twice"))
    again = cpu.decide(smol_path, file_type=3)
    assert (again.extra_buffers, again.source) == (False, "cache") and "SIGSEGV" in again.reason
    doctor = cli("doctor", "--json", env={"EDGELORA_CACHE_DIR": str(own_cache)})
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)["cpu"]
    assert report["extra_buffers"] is False and "SIGSEGV" in report["reason"]


def test_the_probe_runs_in_a_child_with_the_extra_buffers_on(own_cache, smol_path):
    safe, reason, seconds = cpu.run_probe(smol_path)
    assert safe is not None, reason  # this host: either it decoded, or it crashed and we know why
    assert ("decoded" in reason) if safe else ("crashed" in reason)
    assert 0 < seconds < cpu.PROBE_TIMEOUT_S


def test_an_ordinary_load_failure_is_not_remembered_as_a_host_verdict(own_cache, monkeypatch, smol_path):
    monkeypatch.setattr(cpu, "probe_argv", lambda path: [sys.executable, "-c", "raise SystemExit('cannot load')"])
    path = cpu.decide(smol_path, "auto", file_type=3)
    assert path.extra_buffers is False and "cannot load" in path.reason
    assert not cpu.verdicts_path().exists()


@pytest.mark.parametrize("value, expected", [("off", False), ("on", True), ("OFF", False)])
def test_the_setting_overrides_the_probe(own_cache, monkeypatch, smol_path, value, expected):
    monkeypatch.setattr(cpu, "probe_argv", lambda path: pytest.fail("a forced setting must not probe"))
    monkeypatch.setenv(cpu.ENV, value)
    path = cpu.decide(smol_path, file_type=3)
    assert path.extra_buffers is expected and path.source == "setting" and cpu.ENV in path.reason
    with Engine(smol_path, n_ctx=256) as eng:
        assert eng.llama.model_params.use_extra_bufts is expected


def test_the_setting_from_the_config_file_and_bad_values(own_cache, monkeypatch, isolated_home, smol_path):
    monkeypatch.setattr(cpu, "probe_argv", lambda path: pytest.fail("a forced setting must not probe"))
    (isolated_home / "config.toml").write_text('cpu_extra_buffers = "off"\n')
    assert cpu.decide(smol_path, file_type=3).extra_buffers is False
    monkeypatch.setenv(cpu.ENV, "sometimes")
    with pytest.raises(EdgeloraError, match=cpu.ENV):
        cpu.decide(smol_path, file_type=3)
    result = cli("ask", "hi", "--no-log", env={cpu.ENV: "sometimes"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and cpu.ENV in result.stderr


def test_a_native_crash_is_reported_once_on_the_next_run(own_cache):
    # a CLI run that dies the way the AMX crash did: SIGSEGV inside the process, after the run marker
    crash = subprocess.run([sys.executable, "-c", (
        "from edgelora import crashnote; crashnote.start('ask'); "
        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")],
        env={**os.environ, "EDGELORA_CACHE_DIR": str(own_cache)}, capture_output=True)
    assert crash.returncode == -signal.SIGSEGV
    cpu._write_verdicts({"k": {"extra_buffers": True, "reason": "probe decoded"}})

    first = cli("config", "show", env={"EDGELORA_CACHE_DIR": str(own_cache)})
    assert first.returncode == 0
    notes = [line for line in first.stderr.splitlines() if "native crash" in line]
    assert len(notes) == 1 and "edgelora ask" in notes[0] and cpu.ENV in notes[0] and "-v" in notes[0]
    assert json.loads(cpu.verdicts_path().read_text())["k"]["extra_buffers"] is False  # no second crash
    second = cli("config", "show", env={"EDGELORA_CACHE_DIR": str(own_cache)})
    assert "native crash" not in second.stderr


def test_llama_cpp_log_stays_off_the_terminal_unless_verbose(smol_adapters):
    quiet = cli("ask", "hi", "--adapter", str(smol_adapters["a"]), "--max-tokens", "2", "--no-log")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    loud = cli("ask", "hi", "--adapter", str(smol_adapters["a"]), "--max-tokens", "2", "--no-log", "-v")
    assert loud.returncode == 0 and "llama" in loud.stderr


@pytest.mark.parametrize("args, flag", [(["--threads", "100000"], "--threads"), (["--ctx", str(2**40)], "--ctx")])
def test_thread_and_context_bounds(args, flag):
    result = cli("ask", "hi", "--no-log", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and flag in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("user_env, expected", [({}, "10000"), ({"OMP_WAIT_POLICY": "active"}, "None"),
                                                ({"GOMP_SPINCOUNT": "5"}, "5")])
def test_openmp_waiting_is_set_before_llama_cpp_loads_and_the_user_wins(user_env, expected):
    """Busy-waiting OpenMP collapsed generation under load (bench: 0.2 tok/s); edgelora bounds the
    spin before llama.cpp's CPU library (and its OpenMP runtime) is loaded, unless the user chose."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | user_env
    code = ("import sys; import edgelora, os; "
            "maps = open('/proc/self/maps').read(); "
            "print(os.environ.get('GOMP_SPINCOUNT'), 'libgomp' in maps)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [expected, "True"]
