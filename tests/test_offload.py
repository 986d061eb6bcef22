"""Where layers went is read from what llama.cpp did, not from what was asked; the guard for
adapters on a GPU device decides in a child process. These run on any build (the device itself is
tested in test_gpu_vulkan.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgelora import Engine

from edgelora.safety import gpu_adapters

from edgelora.runtime import offload
from edgelora.runtime.backend import backend_info
from edgelora.errors import AdapterError, EdgeloraError

VULKAN_LOG = [
    "llama_model_load_from_file_impl: using device Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits)) (unknown id) - 0 MiB free\n",
    "load_tensors: offloading output layer to GPU\n",
    "load_tensors: offloading 30 repeating layers to GPU\n",
    "load_tensors: offloaded 31/31 layers to GPU\n",
    "load_tensors:      Vulkan0 model buffer size = ", "  103.43 MiB\n",  # llama.cpp logs some lines in pieces
    "load_tensors:   CPU_Mapped model buffer size =    28.12 MiB\n",
]


def test_a_vulkan_load_log_reads_as_the_device_and_its_layers():
    off = offload.parse(VULKAN_LOG)
    assert off.label == "Vulkan0 (llvmpipe): 31/31 layers"
    assert off.devices == (("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)"),)
    assert off.buffers_mib == {"Vulkan0": 103.43, "CPU_Mapped": 28.12}


def test_layers_counted_without_a_device_named_are_not_on_a_device():
    off = offload.parse([line for line in VULKAN_LOG if "using device" not in line and "Vulkan0" not in line])
    assert off.layers == 31 and off.reported and not off.on_device and off.label == "CPU"
    assert not offload.parse(VULKAN_LOG[-1:]).reported  # a CPU-only load says nothing about layers


def test_the_cpu_engine_reports_cpu_from_its_real_load_log(engine):
    assert engine.offload.label == engine.device == "CPU" and engine.gpu_layers == 0
    # the log was captured: the weights' buffer is reported (mapped CPU memory), about the file's size
    weights = sum(engine.offload.buffers_mib.values())
    assert weights > 0.5 * engine.model_path.stat().st_size / 2**20
    assert all(name.startswith("CPU") for name in engine.offload.buffers_mib)


@pytest.mark.skipif(bool(backend_info().offload_devices), reason="a GPU device is visible: test_gpu_vulkan.py covers it")
def test_ask_n_gpu_layers_without_a_device_says_so_and_answers_on_the_cpu():
    out = subprocess.run([sys.executable, "-m", "edgelora", "ask", "Say hi.", "--n-gpu-layers", "-1",
                          "--max-tokens", "2", "--json", "--no-log"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["device"] == "CPU" and report["offload"]["layers_offloaded"] in (0, report["offload"]["layers"])
    assert "--n-gpu-layers -1: nothing offloaded" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_doctor_lists_ggml_devices():
    out = subprocess.run([sys.executable, "-m", "edgelora", "doctor", "--json"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    devices = json.loads(out.stdout)["devices"]
    assert any(d["type"] == "cpu" and d["name"] == "CPU" for d in devices)


# ------------------------------------------------------------------ the adapter guard, in a child

DEVICES = [("Vulkan0", "llvmpipe (LLVM 15.0.6, 256 bits)")]


@pytest.fixture
def guard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(gpu_adapters.ENV, raising=False)
    return tmp_path / "gpu-adapter-probe.json"


def _child(monkeypatch, code: str) -> list:
    calls = []

    def argv(*args):
        calls.append(args)
        return [sys.executable, "-c", code]
    monkeypatch.setattr(gpu_adapters, "probe_argv", argv)
    return calls


def test_a_dying_probe_refuses_adapters_in_one_line_and_is_remembered(guard_cache, monkeypatch, smol_path, smol_adapters):
    calls = _child(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    for _ in range(2):
        with pytest.raises(AdapterError) as err:
            gpu_adapters.check(smol_path, -1, DEVICES, smol_adapters["a"])
        message = str(err.value)
        assert "\n" not in message and "SIGSEGV" in message and "Vulkan0 (llvmpipe" in message
        assert "--n-gpu-layers 0" in message and str(smol_adapters["a"]) in message
    assert len(calls) == 1  # the second check read the verdict
    assert [v["safe"] for v in json.loads(guard_cache.read_text()).values()] == [False]


def test_a_probe_that_decodes_safely_allows_adapters(guard_cache, monkeypatch, smol_path, smol_adapters):
    _child(monkeypatch, "print('ok')")
    gpu_adapters.check(smol_path, -1, DEVICES, smol_adapters["a"])
    assert [v["safe"] for v in json.loads(guard_cache.read_text()).values()] == [True]


def test_an_ordinary_probe_failure_decides_nothing(guard_cache, monkeypatch, smol_path, smol_adapters):
    _child(monkeypatch, "import sys; sys.exit('no such device')")
    with pytest.raises(AdapterError, match="could not check adapters on Vulkan0.*no such device"):
        gpu_adapters.check(smol_path, -1, DEVICES, smol_adapters["a"])
    assert not guard_cache.exists()


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_probe_killed_from_outside_decides_nothing(guard_cache, monkeypatch, smol_path, smol_adapters, sig):
    # the OOM killer, a service stop or Ctrl-C says nothing about the driver
    # SIG_DFL: die by the signal itself (Python would turn SIGINT into KeyboardInterrupt, later)
    reset = "" if sig == "SIGKILL" else f"signal.signal(signal.{sig}, signal.SIG_DFL); "
    _child(monkeypatch, f"import os, signal, time; {reset}os.kill(os.getpid(), signal.{sig}); time.sleep(30)")
    with pytest.raises(AdapterError, match="could not check adapters on Vulkan0.*killed by signal"):
        gpu_adapters.check(smol_path, -1, DEVICES, smol_adapters["a"])
    assert not guard_cache.exists()


def test_the_setting_skips_or_forbids_the_probe(guard_cache, monkeypatch, smol_path, smol_adapters):
    calls = _child(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setenv(gpu_adapters.ENV, "on")
    gpu_adapters.check(smol_path, -1, DEVICES, smol_adapters["a"])
    monkeypatch.setenv(gpu_adapters.ENV, "off")
    with pytest.raises(AdapterError, match="EDGELORA_GPU_ADAPTERS=off"):
        gpu_adapters.check(smol_path, -1, DEVICES, smol_adapters["a"])
    monkeypatch.setenv(gpu_adapters.ENV, "maybe")
    with pytest.raises(EdgeloraError, match="EDGELORA_GPU_ADAPTERS: must be one of auto, on, off"):
        gpu_adapters.check(smol_path, -1, DEVICES, smol_adapters["a"])
    assert calls == []


def test_cpu_engines_never_run_the_probe(clean_engine, smol_adapters, monkeypatch):
    calls = _child(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    clean_engine.attach(smol_adapters["a"], name="a")
    assert calls == [] and clean_engine.active == {"a": 1.0}


def test_engine_with_zero_layers_keeps_ops_on_the_cpu(engine):
    # a GPU build would otherwise send big prompt batches to the device even with 0 layers there
    assert engine.llama.context_params.op_offload is False
    with Engine(engine.model_path, n_gpu_layers=-1, n_ctx=64) as eng:
        assert eng.llama.context_params.op_offload is True


def test_a_native_crash_makes_the_adapter_check_run_again(guard_cache):
    """The probe can miss a rare crash: once a run dies natively, a 'safe' verdict is forgotten."""
    import os
    import signal

    env = {**os.environ, "EDGELORA_CACHE_DIR": str(guard_cache.parent)}
    crash = subprocess.run([sys.executable, "-c", (
        "from edgelora import crashnote; crashnote.start('ask'); "
        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")], env=env, capture_output=True)
    assert crash.returncode == -signal.SIGSEGV
    gpu_adapters._write_verdict("k", {"safe": True, "reason": "probe decoded"})
    gpu_adapters._write_verdict("bad", {"safe": False, "reason": "probe died"})
    after = subprocess.run([sys.executable, "-m", "edgelora", "config", "show"], env=env, capture_output=True, text=True)
    assert after.returncode == 0
    notes = [line for line in after.stderr.splitlines() if "native crash" in line]
    assert len(notes) == 1 and "checked again" in notes[0]
    assert json.loads(guard_cache.read_text()) == {"bad": {"safe": False, "reason": "probe died"}}
