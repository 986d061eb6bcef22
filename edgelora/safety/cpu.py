"""Which CPU kernel path llama.cpp may take on this host, decided without risking the user's process.

llama.cpp's CPU backend repacks weights into "extra buffer types" (weight repacking, AMX) when
``llama_model_params.use_extra_bufts`` is true. On some virtualized Xeons with AMX the AMX matmul
segfaults on any multi-token decode (llama.cpp issue 20824). Whether a host is one of those cannot be
read off its flags, so a child process tries: it loads the model with the extra buffers on and
decodes a multi-token batch. If the child dies, the engine loads with them off. The verdict is kept
per (llama.cpp build, CPU features, model quantization) in the user cache folder, so the probe runs
once per host and model type.

The setting ``cpu_extra_buffers`` ("auto", "on", "off") in the config file (read by the front end and
passed down), or the environment variable EDGELORA_CPU_EXTRA_BUFFERS, overrides the probe for people
who know their machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgelora.runtime import llama
from edgelora.runtime.backend import backend_info
from edgelora.runtime.llama import LlamaHandle
from edgelora.safety import probes, verdicts
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


def configured_setting(config_value: str | None = None) -> tuple[str, str]:
    """(setting, where it came from): the environment variable wins over ``config_value`` (the config
    file's, read by the front end), which wins over the default, 'auto'."""
    value = os.environ.get(ENV)
    if value is not None:
        where = ENV
    elif config_value is not None:
        value, where = config_value, "config cpu_extra_buffers"
    else:
        value, where = "auto", "default"
    value = value.strip().lower()
    if value not in SETTINGS:
        raise EdgeloraError(f"{where}: must be one of {', '.join(SETTINGS)}, got {value!r}")
    return value, where


def engine_settings(config, n_threads: int | None = None) -> dict:
    """Engine keywords from the front end's config (read once there): a --threads flag wins over the config."""
    return {"n_threads": n_threads if n_threads is not None else config.threads,
            "threads_pinned_by": "threads argument" if n_threads is not None else "config threads",
            "cpu_extra_buffers": configured_setting(config.cpu_extra_buffers)[0]}


def cpu_features() -> str:
    """What llama.cpp detected on this CPU, e.g. 'AVX2 AVX512 AMX_INT8 REPACK'."""
    info = backend_info().system_info
    return " ".join(part.split("=")[0].split()[-1] for part in info.split("|") if part.strip().endswith("= 1"))


def has_amx() -> bool:
    return "AMX" in cpu_features()


def probe_key(file_type: object) -> str:
    """The probe's verdict holds for one llama.cpp build, one CPU feature set and one quantization
    (``general.file_type``: llama.cpp picks kernels per weight type)."""
    parts = [backend_info().llama_cpp_python, llama.package_file(), cpu_features(), _cpu_model(), str(file_type)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


STORE = verdicts.Store("cpu-probe.json")


def demote_after_crash(note: str) -> int:
    """A run crashed natively: stop trusting every cached 'safe' verdict. Returns how many changed."""
    data = STORE.read()
    changed = 0
    for key, verdict in data.items():
        if isinstance(verdict, dict) and verdict.get("extra_buffers"):
            data[key] = {**verdict, "extra_buffers": False, "reason": note}
            changed += 1
    if changed:
        STORE.write(data)
    return changed


def decide(model_path: Path, setting: str | None = None, file_type: object = None, where: str = "argument") -> CPUPath:
    """Use llama.cpp's extra buffer types only where they are known to be safe on this host.
    ``setting`` None: the environment variable, else 'auto' (the config file is the front end's to read)."""
    if setting is None:
        setting, where = configured_setting()
    elif setting not in SETTINGS:
        raise EdgeloraError(f"cpu_extra_buffers must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return CPUPath(setting == "on", setting, "setting", f"forced {setting} by {where}")
    key = probe_key(file_type)
    cached = STORE.read().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("extra_buffers"), bool):
        return CPUPath(cached["extra_buffers"], "auto", "cache", str(cached.get("reason", "")))
    safe, reason, seconds = run_probe(model_path)
    if safe is not None:  # a timeout or an ordinary failure decides nothing for later runs
        STORE.put(key, {"extra_buffers": safe, "reason": reason, "probe_s": round(seconds, 3),
                             "features": cpu_features(), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    return CPUPath(bool(safe), "auto", "probe", reason, round(seconds, 3))


def probe_argv(model_path: Path) -> list[str]:
    """The child's command (tests replace it with one that crashes, to check the fallback anywhere)."""
    code = "import sys; from edgelora.safety.cpu import _probe_main; sys.exit(_probe_main(sys.argv[1]))"
    return [sys.executable, "-c", code, str(model_path)]


def run_probe(model_path: Path) -> tuple[bool | None, str, float]:
    """(safe, reason, seconds): load and decode with the extra buffers on, in a child process."""
    child = probes.run_child(probe_argv(model_path), PROBE_TIMEOUT_S, env={**os.environ, ENV: "on"})
    features = cpu_features()
    if child.outcome == "ok":
        return True, f"probe decoded a batch safely with them on ({features})", child.seconds
    if child.outcome == "crashed":
        return False, f"probe crashed with {child.detail} with them on ({features}); llama.cpp issue 20824", child.seconds
    # A timeout, a kill from outside (the OOM killer) or an ordinary failure (a file llama.cpp cannot
    # load) says nothing about the host: not remembered.
    why = {"timeout": f"probe timed out after {PROBE_TIMEOUT_S:g} s",
           "killed": f"probe was killed by signal {child.detail}, not a crash"}.get(child.outcome, f"probe failed with them on ({child.detail})")
    return None, f"{why}; off for this run", child.seconds


MAX_THREADS = 512  # GGML_MAX_N_THREADS: more would overrun ggml's thread arrays


def default_threads() -> int:
    """Every core this process may use: the most threads the adaptive policy (thread_policy.py) runs,
    on an idle machine; under competing work it runs fewer (README 'Threads on a busy machine')."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_threads(n_threads: int | None) -> int:
    """The thread count to use: the argument (the front end passes config `threads`), else every core."""
    if n_threads is None:
        return default_threads()
    limit = min(MAX_THREADS, 4 * default_threads())
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= limit:
        raise EdgeloraError(f"--threads {n_threads}: must be 1 to {limit} (this machine has {default_threads()} cores)")
    return n_threads


def _probe_main(model_path: str) -> int:
    """Child side: load with the extra buffers on and decode a multi-token batch, then a few tokens."""
    handle = LlamaHandle(model_path, n_ctx=256, n_batch=64, extra_buffers=True)
    tokens = handle.tokenize(PROBE_PROMPT.encode())
    handle.eval(tokens)
    for _ in range(4):
        handle.eval([handle.sample(temp=0.0)])
    handle.close()
    print("ok")
    return 0

