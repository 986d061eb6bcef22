"""A small JSON file of cached verdicts (cpu.py's extra-buffers probe, gpu_adapters.py's adapter
check): read whole, written whole through a temporary file and a rename, never fatal."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write(path: Path, data: dict) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs a probe next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
