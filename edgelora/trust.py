"""Admission of an adapter file: one place, whichever way it enters (CLI, API, roles, server, TUI).

- The file is opened once and everything after reads that open file (``/proc/self/fd/N`` on
  Linux): a file swapped in at the path after its sha256 or signature was checked is never loaded.
- ``require_signatures`` / ``trusted_keys`` from the config apply to every adapter.
- An adapter converted for a specific base (``edgelora.base.sha256``) is refused on another base
  unless forced.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import AdapterError, NotGGUFError


class IntegrityError(AdapterError):
    """An adapter file whose sha256 is not the one its manifest pins."""


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
    from .config import cache_dir
    from .gguf_info import sha256_file

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
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp = index.with_name(f".{index.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(index)
        except OSError:
            pass  # an unwritable cache only costs time
    return known[key]


def check_sha256(data: Path, shown: Path, pinned_sha: str) -> None:
    from .gguf_info import sha256_file

    actual = sha256_file(data)
    if actual != pinned_sha:
        raise IntegrityError(f"{shown}: sha256 is {actual}, the manifest pins {pinned_sha}")


def check_signature(data: Path, shown: Path, config=None) -> None:
    """The signature policy of ``config`` (default: the user's config file); the .sig is looked up
    beside ``shown``, the signed bytes are read from ``data``."""
    from . import signing
    from .config import load_config

    config = config or load_config()
    signing.verify(shown, config.trusted_keys, required=config.require_signatures, data=data.read_bytes())


def check_base(info, base_path: Path, shown: Path) -> None:
    """An adapter our converter made records the base it was converted against."""
    made_for = info.metadata.get("edgelora.base.sha256")
    if not isinstance(made_for, str) or not made_for:
        return
    actual = cached_sha256(base_path)
    if made_for != actual:
        raise AdapterError(f"{shown} was converted for base sha256 {made_for[:16]}…; the loaded base "
                           f"{base_path.name} is {actual[:16]}… (--force to try anyway; shapes are still checked)")
