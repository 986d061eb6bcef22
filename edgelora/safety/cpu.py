"""Which CPU kernel path llama.cpp may take on this host, decided without risking the user's process.

llama.cpp's CPU backend repacks weights into "extra buffer types" (weight repacking, AMX) when
``llama_model_params.use_extra_bufts`` is true. On some virtualized Xeons with AMX the AMX matmul
segfaults on any multi-token decode (llama.cpp issue 20824). Whether a host is one of those cannot be
read off its flags, so a child process tries: it loads the model with the extra buffers on and
decodes a multi-token batch. If the child dies, the engine loads with them off. The verdict is kept
per (llama.cpp build, CPU features, model quantization) in the user cache folder, so the probe runs
once per host and model type.

The setting ``cpu_extra_buffers`` ("auto", "on", "off") in the config file, or the environment
variable EDGELORA_CPU_EXTRA_BUFFERS, overrides the probe for people who know their machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import llama_cpp

from edgelora.runtime.backend import backend_info
from edgelora.safety import verdicts
from edgelora.errors import EdgeloraError

SETTINGS = ("auto", "on", "off")
ENV = "EDGELORA_CPU_EXTRA_BUFFERS"
PROBE_TIMEOUT_S = 300.0
PROBE_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4  # a ~40-token batch, as a chat prompt is


@dataclass
class CPUPath:
    """The decision and why. ``source``: 'setting', 'probe' (run now), 'cache' (an earlier probe)."""

    extra_buffers: bool
    setting: str
    source: str
    reason: str
    probe_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return f"extra buffers {'on' if self.extra_buffers else 'off'} ({self.reason})"


def configured_setting() -> tuple[str, str]:
    """(setting, where it came from): the environment variable wins over the config file."""
    value = os.environ.get(ENV)
    if value is not None:
        where = ENV
    else:
        from edgelora.config import load_config

        value, where = load_config().cpu_extra_buffers, "config cpu_extra_buffers"
    value = value.strip().lower()
    if value not in SETTINGS:
        raise EdgeloraError(f"{where}: must be one of {', '.join(SETTINGS)}, got {value!r}")
    return value, where


def cpu_features() -> str:
    """What llama.cpp detected on this CPU, e.g. 'AVX2 AVX512 AMX_INT8 REPACK'."""
    info = backend_info().system_info
    return " ".join(part.split("=")[0].split()[-1] for part in info.split("|") if part.strip().endswith("= 1"))


def has_amx() -> bool:
    return "AMX" in cpu_features()


def probe_key(file_type: object) -> str:
    """The probe's verdict holds for one llama.cpp build, one CPU feature set and one quantization
    (``general.file_type``: llama.cpp picks kernels per weight type)."""
    parts = [backend_info().llama_cpp_python, llama_cpp.__file__, cpu_features(), _cpu_model(), str(file_type)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def verdicts_path() -> Path:
    from edgelora.config import cache_dir

    return cache_dir() / "cpu-probe.json"


def _read_verdicts() -> dict:
    return verdicts.read(verdicts_path())


def _write_verdict(key: str, verdict: dict) -> None:
    _write_verdicts({**_read_verdicts(), key: verdict})


def _write_verdicts(data: dict) -> None:
    verdicts.write(verdicts_path(), data)


def demote_after_crash(note: str) -> int:
    """A run crashed natively: stop trusting every cached 'safe' verdict. Returns how many changed."""
    data = _read_verdicts()
    changed = 0
    for key, verdict in data.items():
        if isinstance(verdict, dict) and verdict.get("extra_buffers"):
            data[key] = {**verdict, "extra_buffers": False, "reason": note}
            changed += 1
    if changed:
        _write_verdicts(data)
    return changed


def decide(model_path: Path, setting: str | None = None, file_type: object = None) -> CPUPath:
    """Use llama.cpp's extra buffer types only where they are known to be safe on this host."""
    where = "argument"
    if setting is None:
        setting, where = configured_setting()
    elif setting not in SETTINGS:
        raise EdgeloraError(f"cpu_extra_buffers must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return CPUPath(setting == "on", setting, "setting", f"forced {setting} by {where}")
    key = probe_key(file_type)
    cached = _read_verdicts().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("extra_buffers"), bool):
        return CPUPath(cached["extra_buffers"], "auto", "cache", str(cached.get("reason", "")))
    safe, reason, seconds = run_probe(model_path)
    if safe is not None:  # a timeout or an ordinary failure decides nothing for later runs
        _write_verdict(key, {"extra_buffers": safe, "reason": reason, "probe_s": round(seconds, 3),
                             "features": cpu_features(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    return CPUPath(bool(safe), "auto", "probe", reason, round(seconds, 3))


def probe_argv(model_path: Path) -> list[str]:
    """The child's command (tests replace it with one that crashes, to check the fallback anywhere)."""
    code = "import sys; from edgelora.safety.cpu import _probe_main; sys.exit(_probe_main(sys.argv[1]))"
    return [sys.executable, "-c", code, str(model_path)]


def run_probe(model_path: Path) -> tuple[bool | None, str, float]:
    """(safe, reason, seconds): load and decode with the extra buffers on, in a child process."""
    t0 = time.perf_counter()
    try:
        child = subprocess.run(probe_argv(model_path), stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=PROBE_TIMEOUT_S, env={**os.environ, ENV: "on"})
    except subprocess.TimeoutExpired:
        return None, f"probe timed out after {PROBE_TIMEOUT_S:g} s; off for this run", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    features = cpu_features()
    if child.returncode == 0 and child.stdout.strip().endswith(b"ok"):
        return True, f"probe decoded a batch safely with them on ({features})", seconds
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        return False, f"probe crashed with {name} with them on ({features}); llama.cpp issue 20824", seconds
    # An ordinary failure (a file llama.cpp cannot load) says nothing about the host: not remembered.
    tail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {child.returncode}"]
    return None, f"probe failed with them on ({tail[0][:160]}); off for this run", seconds


MAX_THREADS = 512  # GGML_MAX_N_THREADS: more would overrun ggml's thread arrays


def default_threads() -> int:
    """Every core this process may use. Measured on 2 cores (README 'Threads'): with a short OpenMP
    spin (edgelora/__init__.py) 2 threads beat 1 both idle and under a competing load."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_threads(n_threads: int | None) -> int:
    """The thread count to use: the argument, else config `threads`, else every core."""
    if n_threads is None:
        from edgelora.config import load_config

        n_threads = load_config().threads
        if n_threads is None:
            return default_threads()
    limit = min(MAX_THREADS, 4 * default_threads())
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= limit:
        raise EdgeloraError(f"--threads {n_threads}: must be 1 to {limit} (this machine has {default_threads()} cores)")
    return n_threads


_params_lock = threading.Lock()


@contextlib.contextmanager
def extra_buffers(enabled: bool):
    """Make ``Llama(...)`` load with ``use_extra_bufts = enabled``.

    llama-cpp-python's Llama has no keyword for it: it starts from llama_model_default_params(), so
    that function is wrapped for the duration of one construction."""
    module = llama_cpp.llama_cpp
    with _params_lock:
        original = module.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = enabled
            return p

        module.llama_model_default_params = params
        try:
            yield
        finally:
            module.llama_model_default_params = original


def _probe_main(model_path: str) -> int:
    """Child side: load with the extra buffers on and decode a multi-token batch, then a few tokens."""
    with extra_buffers(True):
        llama = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_batch=64, verbose=False)
    tokens = llama.tokenize(PROBE_PROMPT.encode())
    llama.eval(tokens)
    for _ in range(4):
        llama.eval([llama.sample(temp=0.0)])
    llama.close()
    print("ok")
    return 0

