"""Sampling options accepted by complete/chat/stream_*: their defaults and bounds, checked."""

from __future__ import annotations

from edgelora.errors import EdgeloraError

# Sampling options accepted by complete/chat/stream_* and their defaults (llama.cpp's usual ones).
SAMPLING_DEFAULTS = {
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "seed": 0,
    "max_tokens": 256,
    "stop": None,
}


_BOUNDS = {  # (low, high, integer): outside these llama.cpp overflows, or the answer is noise
    "temperature": (0, 100, False), "top_p": (0, 1, False), "top_k": (0, 1 << 20, True), "min_p": (0, 1, False),
    "repeat_penalty": (0, 100, False), "seed": (-1, 2**32 - 1, True), "max_tokens": (-1, 1 << 24, True),
}


def _sampling_options(sampling: dict) -> dict:
    """Our sampling names -> Llama.generate's, with edgelora's defaults, each checked."""
    unknown = set(sampling) - SAMPLING_DEFAULTS.keys()
    if unknown:
        raise EdgeloraError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    opts = {**SAMPLING_DEFAULTS, **{k: v for k, v in sampling.items() if v is not None}}
    for key, (lo, hi, integer) in _BOUNDS.items():
        value = opts[key]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not (lo <= value <= hi):  # NaN fails the comparison too
            kind, span = ("an integer", f"{lo} to {hi}") if integer else ("a number", f"{lo:g} to {hi:g}")
            raise EdgeloraError(f"{key.replace('_', '-')} must be {kind} from {span}, got {value!r}")
    stop = opts.pop("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(x, str) for x in stop):
        raise EdgeloraError(f"stop must be strings, got {stop!r}")
    opts["stop"] = stop
    opts["temp"] = float(opts.pop("temperature"))
    opts["max_tokens"] = int(opts["max_tokens"])
    opts["seed"] = int(opts["seed"])
    return opts
