"""The one sampling table: every sampling option, its type, bounds, default and help.

Everything that takes sampling values reads it: the engine's checks (``_sampling_options``), the
click options of `ask` and `chat` (``click_options``), the server's request fields (``check_value``
in frontends/server) and the ``[sampling]`` keys of role manifests (``check_value`` in
roles/manifest.py). So one value is accepted or refused the same way everywhere.

Bounds: temperature 0-2 as OpenAI's API (clients move between servers unchanged; above 2 a small
model's answer is noise); seed -1 (a random seed, llama.cpp's convention) to 2**32-1 (llama.cpp's
seed is 32-bit); repeat_penalty 0-10 (past 2 answers already degenerate); max_tokens 1-2**24 (the
engine stops at the context's end anyway, finish_reason 'length')."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgelora.errors import SamplingError


@dataclass(frozen=True)
class Knob:
    name: str
    type: type  # float (an int is fine too) or int
    low: float
    high: float
    default: float | int
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SAMPLING = (
    Knob("temperature", float, 0, 2, 0.8, "Sampling temperature (0 = greedy)."),
    Knob("top_p", float, 0, 1, 0.95, "Nucleus sampling: keep the likeliest tokens up to this total probability."),
    Knob("top_k", int, 0, 1 << 20, 40, "Sample among the K likeliest tokens (0 = all)."),
    Knob("min_p", float, 0, 1, 0.05, "Drop tokens less likely than this fraction of the likeliest."),
    Knob("repeat_penalty", float, 0, 10, 1.0, "Penalty for repeating tokens (1 = none)."),
    Knob("seed", int, -1, 2**32 - 1, 0, "Sampling seed (-1 = a random one)."),
    Knob("max_tokens", int, 1, 1 << 24, 256, "Most tokens to generate"),
)
KNOBS = {k.name: k for k in SAMPLING}

# Sampling options accepted by complete/chat/stream_* and their defaults (llama.cpp's usual ones).
SAMPLING_DEFAULTS = {**{k.name: k.default for k in SAMPLING}, "stop": None}

_BOUNDS = {k.name: (k.low, k.high, k.type is int) for k in SAMPLING}  # (low, high, integer)


def check_value(key: str, value, where: str | None = None):
    """``value`` if the table allows it for ``key``; otherwise a SamplingError naming ``where``
    (a flag, a request field, a manifest key; default the key itself)."""
    knob = KNOBS[key]
    integer = knob.type is int
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    finite = not isinstance(value, float) or math.isfinite(value)  # an int of any size compares exactly
    if isinstance(value, bool) or not ok or not finite or not knob.low <= value <= knob.high:
        kind, span = ("an integer", f"{knob.low} to {knob.high}") if integer else ("a number", f"{knob.low:g} to {knob.high:g}")
        raise SamplingError(f"{where or key} must be {kind} from {span}, got {value!r}", key)
    return value


def click_options(names=None):
    """The table's rows as click options (``--top-p`` ...), bounded as everywhere else."""
    import click

    def decorate(f):
        for knob in reversed([k for k in SAMPLING if names is None or k.name in names]):
            kind = click.IntRange(knob.low, knob.high) if knob.type is int else click.FloatRange(knob.low, knob.high)
            help = knob.help if knob.name != "max_tokens" else f"{knob.help} [default: {knob.default}]."
            f = click.option(knob.flag, knob.name, type=kind, default=None, help=help)(f)
        return f

    return decorate


def _sampling_options(sampling: dict) -> dict:
    """Our sampling names -> Llama.generate's, with edgelora's defaults, each checked."""
    unknown = set(sampling) - SAMPLING_DEFAULTS.keys()
    if unknown:
        raise SamplingError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    opts = {**SAMPLING_DEFAULTS, **{k: v for k, v in sampling.items() if v is not None}}
    for knob in SAMPLING:
        check_value(knob.name, opts[knob.name], knob.name.replace("_", "-"))
    stop = opts.pop("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(x, str) for x in stop):
        raise SamplingError(f"stop must be strings, got {stop!r}", "stop")
    opts["stop"] = stop
    opts["temp"] = float(opts.pop("temperature"))
    opts["max_tokens"] = int(opts["max_tokens"])
    opts["seed"] = int(opts["seed"])
    return opts
