"""File helpers every part of edgelora shares, each written once: refuse what is not a regular file,
pin the file that was opened, sha256 (cached for big files), atomic writes and the process-alive
check of stale temps (the last two are the converter's, which stays usable on its own)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from edgelora.convert.errors import ConvertError
from edgelora.convert.outputs import atomic_output, pid_alive  # noqa: F401  (re-exported)
from edgelora.convert.peft_source import sha256_file
from edgelora.errors import NotGGUFError


def check_regular_file(path: Path, what: str = "") -> None:
    """Refuse FIFOs, devices and folders before opening them (a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NotGGUFError(f"{path}: no such file") from None
    except OSError as exc:
        raise NotGGUFError(f"{path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise NotGGUFError(f"{path}{' ' + what if what else ''} is {kind}")


@contextlib.contextmanager
def pinned(path: Path) -> Iterator[Path]:
    """A path that names the very file opened now, whatever happens at ``path`` afterwards."""
    check_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:  # no read permission, removed meanwhile
        raise NotGGUFError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        proc = Path(f"/proc/self/fd/{fd}")
        yield proc if proc.exists() else path  # not Linux: the path itself (the window stays)
    finally:
        os.close(fd)


def cached_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered by path, size and mtime in the user cache folder."""
    from edgelora.config import cache_dir

    path = Path(path).resolve()
    st = path.stat()
    index = cache_dir() / "sha256.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        with contextlib.suppress(OSError, ConvertError):  # an unwritable cache only costs time
            index.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(index) as tmp:
                tmp.write_text(json.dumps(known))
    return known[key]
