"""The offload path on a real, non-CPU ggml device: llama.cpp's Vulkan backend on Mesa's software
Vulkan driver (llvmpipe) does here what it does on a laptop GPU. Weights, adapters, KV cache and
compute buffers live in that device's buffers.

Run with a Vulkan build of llama-cpp-python (README 'GPU offload'):

    vk=$(sh packaging/vulkan-wheel.sh --env) && eval "$vk" && .venv/bin/python -m pytest -q -m gpu

The tests skip, saying why, where no GPU device is visible; with EDGELORA_REQUIRE_GPU=1 (CI) they
fail instead. The device is slow (about 1.5 tokens/s), so token counts are small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgelora import Engine
from edgelora.runtime.backend import backend_info
from edgelora.errors import AdapterError

from ..conftest import GREEDY, reset_engine

pytestmark = pytest.mark.gpu

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
TOKENS = 6
# Device vs device: logits() evaluates the same tokens in one batch, and after A -> B -> A and after
# a detach they measured bitwise equal to a fresh device engine's (max |Δ| 0.0). 0.1 allows other
# drivers some nondeterminism; it is a fifth of the smallest device-vs-CPU gap measured (0.53) and
# far below what the test adapters change (max |Δ| 7.9 and 18 against the base).
SAME_DEVICE_TOL = 0.1
# Device vs CPU (other kernels, other rounding; `edgelora bench --only gpu`, 8 prompts): max |Δ|
# 0.53–1.46 of logits spanning ~35, mean 0.10–0.29 without an adapter (0.71 with a random one);
# the top token differed only at near-ties (the CPU's top two 0.35 and 0.10 apart). This prompt's
# top two are 2.2 apart, measured max |Δ| 0.97, mean 0.29.
CPU_MAX_TOL, CPU_MEAN_TOL = 2.5, 0.4


def _require_device():
    b = backend_info()
    if b.offload_devices:
        return
    if b.build == "CPU":
        why = "this llama.cpp build is CPU-only: eval \"$(sh packaging/vulkan-wheel.sh --env)\" first"
    else:
        why = f"the {b.build} build sees no GPU device (a software Vulkan device needs GGML_VK_VISIBLE_DEVICES=0)"
    if os.environ.get("EDGELORA_REQUIRE_GPU"):
        pytest.fail(f"EDGELORA_REQUIRE_GPU is set but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def device_engine(smol_path):
    _require_device()
    eng = Engine(smol_path, n_gpu_layers=-1, n_ctx=512)
    yield eng
    eng.close()


@pytest.fixture
def gpu(device_engine):
    """The device engine with nothing attached or resident, before and after the test."""
    reset_engine(device_engine)
    yield device_engine
    reset_engine(device_engine)


def _answer(eng) -> str:
    return eng.chat(PROMPT, max_tokens=TOKENS, **GREEDY).text


def _prompt_tokens(eng) -> list[int]:
    return eng.render_chat(PROMPT)[0]


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    assert int(np.argmax(a)) == int(np.argmax(b))
    assert float(np.max(np.abs(a - b))) <= tol, float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def fresh_on_device(smol_path, smol_adapters):
    """A brand-new device engine per adapter set: answer and last-position logits (the truth)."""
    seen = {}

    def run(**scales):
        key = tuple(sorted(scales.items()))
        if key not in seen:
            with Engine(smol_path, n_gpu_layers=-1, n_ctx=512) as eng:
                for name, s in scales.items():
                    eng.attach(smol_adapters[name], name=name, scale=s)
                seen[key] = (_answer(eng), eng.logits(_prompt_tokens(eng)))
        return seen[key]
    return run


def test_all_layers_are_on_the_device(device_engine):
    off = device_engine.offload
    assert off.on_device and off.layers == off.of == device_engine.n_layers + 1  # + the output layer
    name, description = off.devices[0]
    assert name.startswith(tuple(backend_info().backends)) and name != "CPU"
    assert device_engine.device.startswith(f"{name} (") and device_engine.device.endswith(f"{off.of}/{off.of} layers")
    # the weights are in the device's buffer; only the token embedding table stays in mapped CPU
    # memory (llama.cpp looks its rows up on the CPU): 92.1 of 120.8 MiB for SmolLM2 Q4_1
    assert off.buffers_mib.get(name, 0) > 0.7 * sum(off.buffers_mib.values())


def test_partial_offload_puts_that_many_layers_on_the_device(smol_path):
    _require_device()
    with Engine(smol_path, n_gpu_layers=10, n_ctx=256) as eng:
        assert eng.offload.layers == eng.gpu_layers == 10
        assert eng.device.endswith(f": 10/{eng.offload.of} layers")
        cpu_mib = sum(v for k, v in eng.offload.buffers_mib.items() if k.startswith("CPU"))
        assert cpu_mib > eng.offload.buffers_mib[eng.offload.devices[0][0]]  # 20 of 30 blocks stay


@pytest.fixture(scope="module")
def cpu_engine(smol_path):
    """The CPU reference, like for like: flash attention off, as on the device (the CPU default is on)."""
    with Engine(smol_path, n_ctx=512, flash_attn=False) as eng:
        yield eng


def test_device_logits_agree_with_the_cpu(device_engine, cpu_engine):
    engine = cpu_engine
    tokens = _prompt_tokens(engine)
    on_device, on_cpu = device_engine.logits(tokens), engine.logits(tokens)
    assert int(np.argmax(on_device)) == int(np.argmax(on_cpu))
    diff = np.abs(on_device - on_cpu)
    assert float(diff.max()) <= CPU_MAX_TOL and float(diff.mean()) <= CPU_MEAN_TOL
    assert float(diff.max()) > 0  # a real other device: if these were equal, nothing ran there


def test_adapter_changes_the_answer_and_detach_restores_the_base(gpu, fresh_on_device):
    from edgelora.roles.manifest import bundled_dir

    base_text, base_logits = fresh_on_device()
    assert _answer(gpu) == base_text
    gpu.attach(bundled_dir() / "pirate.gguf", name="pirate")  # a trained adapter: "Arr..." from the first token
    pirate = _answer(gpu)
    assert pirate != base_text and pirate.split()[0].lower().startswith("arr"), pirate
    gpu.detach("pirate")
    assert _answer(gpu) == base_text
    _close(gpu.logits(_prompt_tokens(gpu)), base_logits, SAME_DEVICE_TOL)


def test_a_b_a_switching_equals_fresh_engines_on_the_device(gpu, smol_adapters, fresh_on_device):
    gpu.load(smol_adapters["a"], name="a")
    gpu.load(smol_adapters["b"], name="b")
    got = {}
    for step, name in enumerate(["a", "b", "a"]):
        gpu.set_adapters({name: 1.0})
        got[step] = (_answer(gpu), gpu.logits(_prompt_tokens(gpu)))
    for step, name in enumerate(["a", "b", "a"]):
        text, logits = fresh_on_device(**{name: 1.0})
        assert got[step][0] == text, (step, name)
        _close(got[step][1], logits, SAME_DEVICE_TOL)
    assert got[0][0] != got[1][0]


def test_kv_state_saved_and_restored_on_the_device_matches_a_fresh_evaluation(gpu, smol_path, smol_adapters):
    gpu.load(smol_adapters["a"], name="a")
    gpu.load(smol_adapters["b"], name="b")
    history = [{"role": "user", "content": "Name a sea."}]
    gpu.set_adapters({"a": 1.0})
    first = gpu.chat(history, max_tokens=4, **GREEDY)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a river?"}]
    gpu.set_adapters({"b": 1.0})
    gpu.chat(history, max_tokens=2, **GREEDY)  # B's turn: A's KV state is saved off the device
    assert any(key and key[0][0] == "a" for key in gpu.kv_states.keys())
    gpu.set_adapters({"a": 1.0})
    again = gpu.chat(history, max_tokens=4, **GREEDY)  # A's state is put back on the device
    assert again.cached_tokens >= first.prompt_tokens  # restored, not re-evaluated
    with Engine(smol_path, n_gpu_layers=-1, n_ctx=512, kv_cache_bytes=0) as fresh:
        fresh.attach(smol_adapters["a"], name="a")
        truth = fresh.chat(history, max_tokens=4, **GREEDY)
        assert truth.cached_tokens == 0
    assert again.text == truth.text


def test_bundled_roles_behave_on_the_device_as_on_the_cpu(device_engine, cpu_engine):
    engine = cpu_engine
    from edgelora.config import Config
    from edgelora.roles.manifest import RoleCatalog, bundled_dir
    from edgelora.roles.session import Roles

    prompt = [{"role": "user", "content": "How do I keep basil alive?"}]
    answers = {}
    for eng in (device_engine, engine):
        roles = Roles(eng, Config(), catalog=RoleCatalog([bundled_dir()]))
        for role in ("pirate", "json", "terse", "signoff"):
            roles.use([role])
            eng.new_conversation()
            answers[eng is engine, role] = roles.chat(prompt, max_tokens=8, temperature=0.0, seed=0).text
        roles.use(["base"])
        eng.detach_all()
    for role in ("pirate", "json", "terse", "signoff"):
        on_device, on_cpu = answers[False, role], answers[True, role]
        assert on_device.split()[:3] == on_cpu.split()[:3], (role, on_device, on_cpu)
    assert answers[False, "json"].lstrip().startswith("{")


def test_adapters_are_refused_in_one_line_where_the_probe_dies(smol_path, smol_adapters, tmp_path, monkeypatch):
    """The guard for drivers that crash on adapters: a child that dies means a refusal, not a dead process."""
    _require_device()
    from edgelora.safety import gpu_adapters

    monkeypatch.setenv("EDGELORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gpu_adapters, "probe_argv", lambda *a: [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    with Engine(smol_path, n_gpu_layers=-1, n_ctx=256) as eng:
        before = eng.chat(PROMPT, max_tokens=3, **GREEDY).text
        with pytest.raises(AdapterError) as err:
            eng.attach(smol_adapters["a"], name="a")
        message = str(err.value)
        assert "\n" not in message and "SIGSEGV" in message and "--n-gpu-layers 0" in message
        assert eng.active == {} and eng.resident == {}
        assert eng.chat(PROMPT, max_tokens=3, **GREEDY).text == before  # the model keeps working
    verdicts = json.loads((tmp_path / "gpu-adapter-probe.json").read_text())
    assert [v["safe"] for v in verdicts.values()] == [False]


def test_a_gpu_build_that_sees_no_device_says_how_to_show_llvmpipe():
    _require_device()
    env = {k: v for k, v in os.environ.items() if k != "GGML_VK_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-m", "edgelora", "ask", "Say hi.", "--n-gpu-layers", "-1",
                          "--max-tokens", "2", "--json", "--no-log"], env=env,
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["device"] == "CPU"
    assert "nothing offloaded" in out.stderr and "GGML_VK_VISIBLE_DEVICES=0" in out.stderr


def test_ask_json_reports_the_device(smol_path):
    _require_device()
    out = subprocess.run([sys.executable, "-m", "edgelora", "ask", "Say hi.", "--n-gpu-layers", "-1",
                          "--max-tokens", "2", "--json", "--no-log"],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["device"].endswith(f"{report['offload']['layers']}/{report['offload']['layers']} layers")
    assert report["offload"]["devices"][0]["name"] != "CPU"
    doctor = subprocess.run([sys.executable, "-m", "edgelora", "doctor", "--n-gpu-layers", "-1", "--json"],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert doctor.returncode == 0, doctor.stderr
    d = json.loads(doctor.stdout)
    assert d["offload"]["device"] == report["device"]
    assert any(dev["type"] in ("gpu", "igpu") for dev in d["devices"])
