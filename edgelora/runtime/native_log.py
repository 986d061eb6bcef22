"""llama.cpp's own log (and ggml's): off the terminal unless asked for (-v), last lines kept.

llama-cpp-python prints some of it on stderr whatever ``verbose`` says (e.g. "lora for
'blk.9.attn_v.weight' cannot use buft 'AMX', fallback to CPU" when an adapter loads). One callback
for the whole process routes every line here instead; errors can quote the recent lines."""

from __future__ import annotations

import collections
import contextlib
import sys

import llama_cpp

_recent: collections.deque[str] = collections.deque(maxlen=64)
_verbose = False
_captures: list[list[str]] = []  # open capture() blocks, innermost last


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, user_data) -> None:
    line = text.decode("utf-8", errors="replace")
    _recent.append(line)
    for lines in _captures:
        lines.append(line)
    if _verbose:
        sys.stderr.write(line)
        sys.stderr.flush()


def install() -> None:
    llama_cpp.llama_log_set(_on_log, None)


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


@contextlib.contextmanager
def capture():
    """Every line llama.cpp logs inside the block, in a list (what a model load reports about its
    devices and offloaded layers is only said there)."""
    lines: list[str] = []
    _captures.append(lines)
    try:
        yield lines
    finally:
        _captures[:] = [c for c in _captures if c is not lines]  # by identity: equal lists are not the same block


def recent(n: int = 5) -> str:
    """The last n lines llama.cpp logged, joined (for error messages)."""
    lines = "".join(_recent).strip().splitlines()
    return " | ".join(lines[-n:])


install()
