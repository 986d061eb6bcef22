"""Resident adapters and the active set as llama.cpp gets it.

An adapter is loaded once (``Adapter``: its pointer in llama.cpp and its checked metadata) and may be
active or not; the active set, in attach order with scales, travels with each request and the
scheduler sets it on the context that decodes it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import EdgeloraError, UnknownAdapterError
from edgelora.models.gguf_info import GGUFInfo

_SERIALS = itertools.count(1)
MAX_SCALE = 4.0  # llama.cpp takes any float; past a few times the trained strength the output is garbage


@dataclass
class Adapter:
    """A resident adapter: loaded into llama.cpp, attached or not."""

    name: str
    path: Path
    info: GGUFInfo
    handle: object  # llama_adapter_lora pointer
    serial: int = field(default_factory=lambda: next(_SERIALS))  # identity for KV keys (addresses get reused)
    sha256: str | None = None  # the pin it was loaded under: a file rewritten in place is another version

    @property
    def size(self) -> int:
        return self.info.size


def check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -MAX_SCALE <= scale <= MAX_SCALE:
        raise EdgeloraError(f"adapter scale must be a number from {-MAX_SCALE:g} to {MAX_SCALE:g} "
                            f"(negative subtracts the adapter), got {scale!r}")


def names(d: dict) -> str:
    return ", ".join(d) or "none"


def require(resident: dict[str, Adapter], name: str) -> Adapter:
    try:
        return resident[name]
    except KeyError:
        raise UnknownAdapterError(f"adapter {name!r} is not loaded (loaded: {names(resident)})") from None


def set_key(resident: dict[str, Adapter], active: dict[str, float]) -> tuple:
    """What identifies the KV cells computed under this active set: names, adapter identities, scales."""
    return tuple((name, resident[name].serial, s) for name, s in active.items())


def report(resident: dict[str, Adapter], active: dict[str, float]) -> list[dict]:
    return [{"name": n, "path": str(resident[n].path), "scale": s} for n, s in active.items()]
