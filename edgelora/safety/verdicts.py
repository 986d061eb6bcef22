"""The probes' verdicts (cpu.py's extra-buffers probe, gpu_adapters.py's adapter check): a small JSON
file per probe in the user cache, read whole, written whole and atomically, never fatal."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from edgelora.convert.errors import ConvertError
from edgelora.files import atomic_output


class Store:
    """One probe's verdicts by key (host, build, model kind), in ``<cache>/<name>``."""

    def __init__(self, name: str):
        self.name = name

    @property
    def path(self) -> Path:
        from edgelora.config import cache_dir  # where the cache is may change per process (tests, EDGELORA_CACHE_DIR)

        return cache_dir() / self.name

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def write(self, data: dict) -> None:
        path = self.path
        with contextlib.suppress(OSError, ConvertError):  # a read-only cache only costs a probe next time
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                tmp.write_text(json.dumps(data, indent=1))

    def put(self, key: str, verdict: dict) -> None:
        self.write({**self.read(), key: verdict})
