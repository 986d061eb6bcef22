"""The one place every command builds its runtime: the engine on the chosen base, the roles bound to
it, the preloaded roles' adapters. The config is read once by the command and handed down here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgelora.config import Config
from edgelora.roles.session import Roles
from edgelora.runtime.engine import Engine


def open_runtime(config: Config, *, model: str | None = None, n_gpu_layers: int = 0, n_ctx: int | None = None,
                 n_threads: int | None = None, verbose: bool = False, reuse_prefix: bool = True,
                 manifests: Sequence[Path] = (), preload: Sequence[str] = (), force: bool = False) -> Roles:
    """Engine + Roles (+ preload) from the command's options and ``config``; ``roles.engine`` is the engine.
    ``manifests``: role manifests given by path; ``force``: use roles made for another base."""
    engine = Engine(model or config.default_model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
                    n_threads=n_threads if n_threads is not None else config.threads,
                    cpu_extra_buffers=config.cpu_extra_buffers, kv_cache_bytes=config.kv_cache_bytes,
                    verbose=verbose, reuse_prefix=reuse_prefix, config=config)
    try:
        roles = Roles(engine, config, extra=list(manifests), force=force)
        roles.preload(list(preload))
    except BaseException:
        engine.close()  # a bad role or preload: the model is not left half-owned
        raise
    return roles
