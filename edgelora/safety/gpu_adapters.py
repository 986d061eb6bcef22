"""Whether LoRA adapters may be used on the GPU device the model was offloaded to, decided in a
child process, because when they may not, llama.cpp does not fail: it kills the process.

With layers offloaded, llama.cpp puts each adapter tensor beside the weight it modifies, on the
device, and rebuilds its compute graph and buffers on the next decode after the adapter set
changes. On Mesa 22.3's software Vulkan driver (llvmpipe, Debian 12) that first decode corrupts
the heap in the driver's worker thread most of the time (README 'GPU offload'); other drivers may
have bugs of their own. So before the first adapter is loaded on a device, a child process loads
the model the same way, attaches the adapter, changes its scale and switches it off and on,
decoding after each switch. If the child dies, adapters are refused on that device with one line that says what to
do, and the user's process, its model and its conversation live on.

The verdict is kept per (llama.cpp build, devices, driver libraries) in the cache folder.
EDGELORA_GPU_ADAPTERS=on skips the probe, =off refuses adapters on a device without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp

from edgelora.safety import verdicts
from edgelora.errors import AdapterError, EdgeloraError

ENV = "EDGELORA_GPU_ADAPTERS"
# What a driver bug kills a process with; SIGKILL, SIGTERM or SIGINT come from outside and decide nothing.
CRASH_SIGNALS = {s.value for s in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP)}
SETTINGS = ("auto", "on", "off")
PROBE_TIMEOUT_S = 300.0
# Each switch rebuilds llama.cpp's compute buffers. On Mesa 22.3 llvmpipe a process either dies in
# its first few switches or not at all (one child of 24 switches: 2 deaths in 4 probes; of 6: 3
# in 5), so the probe is several short children rather than one long one.
PROBE_CHILDREN = 3
PROBE_SWITCHES = 6  # per child
PROBE_SCALES = ({"probe": 1.0}, {"probe": 0.5}, {})
PROBE_PROMPT = "The sea is"


def setting() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in SETTINGS:
        raise EdgeloraError(f"{ENV}: must be one of {', '.join(SETTINGS)}, got {value!r}")
    return value


def _driver_libraries() -> list[str]:
    """The GPU driver libraries mapped into this process (a Vulkan ICD, CUDA's driver...), with
    their sizes: two Mesa versions describe llvmpipe the same way, their libraries differ."""
    seen: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(None, 5)[-1] if line.count(" ") >= 5 else ""
            name = os.path.basename(path)
            if name.startswith(("libvulkan_", "libcuda.", "libnvidia-", "libamdhip", "libze_")) and path not in seen:
                with contextlib.suppress(OSError):
                    seen[path] = os.path.getsize(path)
    return [f"{p}:{n}" for p, n in sorted(seen.items())]


def probe_key(devices: list[tuple[str, str]]) -> str:
    parts = [llama_cpp.__file__, _build_id(), *(f"{n}={d}" for n, d in devices), *_driver_libraries()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _build_id() -> str:
    lib = Path(llama_cpp.__file__).parent / "lib"
    with contextlib.suppress(OSError):
        return ",".join(f"{p.name}:{p.stat().st_size}" for p in sorted(lib.glob("lib*.so*")))
    return ""


def verdicts_path() -> Path:
    from edgelora.config import cache_dir

    return cache_dir() / "gpu-adapter-probe.json"


def _read_verdicts() -> dict:
    return verdicts.read(verdicts_path())


def _write_verdict(key: str, verdict: dict) -> None:
    _write_verdicts({**_read_verdicts(), key: verdict})


def _write_verdicts(data: dict) -> None:
    verdicts.write(verdicts_path(), data)


def forget_after_crash() -> int:
    """A run died natively: forget 'safe' verdicts, so the next adapter on a device is checked again
    (the probe can miss a rare crash; whether this one came from a device is not known)."""
    data = _read_verdicts()
    safe = [k for k, v in data.items() if isinstance(v, dict) and v.get("safe") is True]
    for key in safe:
        del data[key]
    if safe:
        _write_verdicts(data)
    return len(safe)


def check(model_path: Path, n_gpu_layers: int, devices: list[tuple[str, str]], adapter_path: Path) -> None:
    """Raise AdapterError (one line) unless adapters are known or found safe on these devices."""
    where = ", ".join(f"{n} ({d})" for n, d in devices)
    mode = setting()
    if mode == "on":
        return
    if mode == "off":
        raise AdapterError(f"{adapter_path}: adapters on {where} are off ({ENV}=off); "
                           "load the model with n_gpu_layers=0 (--n-gpu-layers 0) to use adapters on the CPU")
    key = probe_key(devices)
    verdict = _read_verdicts().get(key)
    if not (isinstance(verdict, dict) and isinstance(verdict.get("safe"), bool)):
        safe, reason, seconds = run_probe(model_path, n_gpu_layers, adapter_path)
        if safe is None:  # timed out or failed for an ordinary reason: decide nothing for later runs
            raise AdapterError(f"{adapter_path}: could not check adapters on {where}: {reason}; "
                               f"load the model with n_gpu_layers=0 (--n-gpu-layers 0), or set {ENV}=on to skip the check")
        verdict = {"safe": safe, "reason": reason, "probe_s": round(seconds, 3), "devices": where,
                   "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_verdict(key, verdict)
    if not verdict["safe"]:
        raise AdapterError(f"{adapter_path}: LoRA adapters crash llama.cpp on {where} ({verdict['reason']}); "
                           f"load the model with n_gpu_layers=0 (--n-gpu-layers 0) to use adapters on the CPU, or set {ENV}=on to try anyway")


def probe_argv(model_path: Path, n_gpu_layers: int, adapter_path: Path) -> list[str]:
    """The child's command (tests replace it with one that crashes, to check the refusal anywhere)."""
    code = "import sys; from edgelora.safety.gpu_adapters import _probe_main; sys.exit(_probe_main(*sys.argv[1:]))"
    return [sys.executable, "-c", code, str(model_path), str(n_gpu_layers), str(adapter_path)]


def run_probe(model_path: Path, n_gpu_layers: int, adapter_path: Path) -> tuple[bool | None, str, float]:
    """(safe, reason, seconds): PROBE_CHILDREN children in turn; the first that dies decides."""
    t0 = time.perf_counter()
    for _ in range(PROBE_CHILDREN):
        try:
            child = subprocess.run(probe_argv(model_path, n_gpu_layers, adapter_path), stdin=subprocess.DEVNULL,
                                   capture_output=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, f"the probe timed out after {PROBE_TIMEOUT_S:g} s", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        if child.returncode == 0 and child.stdout.strip().endswith(b"ok"):
            continue
        if -child.returncode in CRASH_SIGNALS:
            name = signal.Signals(-child.returncode).name
            return False, f"a child process died with {name} decoding after an adapter switch", seconds
        if child.returncode < 0:  # killed from outside (OOM killer, Ctrl-C, a service stop): no verdict
            return None, f"the probe was killed by signal {-child.returncode}", seconds
        tail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {child.returncode}"]
        return None, f"the probe failed ({tail[0][:160]})", seconds
    return True, (f"{PROBE_CHILDREN} child processes switched adapters {PROBE_SWITCHES} times each "
                  "and decoded safely"), time.perf_counter() - t0


def _probe_main(model_path: str, n_gpu_layers: str, adapter_path: str) -> int:
    """Child side: what the engine does on a switch, a few times: set adapters, decode, unset, decode."""
    from edgelora.runtime.engine import Engine

    os.environ[ENV] = "on"  # this process is the check
    with Engine(model_path, n_gpu_layers=int(n_gpu_layers), n_ctx=256, kv_cache_bytes=0) as eng:
        eng.load(adapter_path, name="probe", force=True)
        for i in range(PROBE_SWITCHES):
            eng.set_adapters(PROBE_SCALES[i % len(PROBE_SCALES)])
            eng.new_conversation()
            eng.complete(PROBE_PROMPT, max_tokens=2, temperature=0.0)
    print("ok")
    return 0
