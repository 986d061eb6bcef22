"""Admission of an adapter file: one place, whichever way it enters (CLI, API, roles, server, TUI).

- The file is opened once and everything after reads that open file (``/proc/self/fd/N`` on
  Linux): a file swapped in at the path after its sha256 or signature was checked is never loaded.
- ``require_signatures`` / ``trusted_keys`` from the config apply to every adapter.
- An adapter converted for a specific base (``edgelora.base.sha256``) is refused on another base
  unless forced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from edgelora.errors import AdapterError
from edgelora.files import cached_sha256, check_regular_file, pinned  # noqa: F401  (re-exported)


class IntegrityError(AdapterError):
    """An adapter file whose sha256 is not the one its manifest pins."""


@contextlib.contextmanager
def admitted(path: Path, base, base_path: Path, config, *, sha256: str | None = None,
             force: bool = False) -> Iterator[tuple[Path, object]]:
    """The one admission of an adapter file: opened once, then its ``sha256`` pin (when given), the
    signature policy of ``config``, the structural checks against ``base`` (a GGUFInfo) and the base
    it was converted for (unless ``force``). Yields (the path of the open file, its GGUFInfo): load
    from that path, inside the block, so what was checked is what is loaded."""
    from edgelora.models.gguf_info import validate_adapter

    with pinned(path) as data:
        if sha256 is not None:
            check_sha256(data, path, sha256)
        check_signature(data, path, config)
        try:
            info = validate_adapter(data, base)
        except AdapterError as exc:  # name the user's file, not /proc/self/fd/N
            raise type(exc)(str(exc).replace(str(data), str(path))) from None
        info.path = path
        if not force:
            check_base(info, base_path, path)
        yield data, info


def verify_file(path: Path, sha256: str, config) -> None:
    """The pin and signature of a file not loaded now (`adapters verify`, a bundle, a role's files)."""
    with pinned(path) as data:
        check_sha256(data, path, sha256)
        check_signature(data, path, config)


def check_sha256(data: Path, shown: Path, pinned_sha: str) -> None:
    from edgelora.files import sha256_file

    actual = sha256_file(data)
    if actual != pinned_sha:
        raise IntegrityError(f"{shown}: sha256 is {actual}, the manifest pins {pinned_sha}")


def check_signature(data: Path, shown: Path, config) -> None:
    """The signature policy of ``config`` (read once by the front end); the .sig is looked up beside
    ``shown``, the signed bytes are read from ``data``."""
    from edgelora.safety import signing

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
