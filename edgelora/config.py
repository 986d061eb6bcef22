"""The user's config file (TOML, in the platformdirs config folder) and the user's folders."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import platformdirs

from ._toml import tomllib
from .errors import EdgeloraError

APP = "edgelora"


class ConfigError(EdgeloraError):
    pass


def config_path() -> Path:
    return Path(os.environ.get("EDGELORA_CONFIG") or Path(platformdirs.user_config_dir(APP)) / "config.toml")


def data_dir() -> Path:
    """Roles added by the user, converted adapters, history. EDGELORA_HOME overrides (tests use it)."""
    home = os.environ.get("EDGELORA_HOME")
    return Path(home) if home else Path(platformdirs.user_data_dir(APP))


def cache_dir() -> Path:
    """Derived files only (hashes, probe verdicts, conversions): EDGELORA_CACHE_DIR overrides."""
    if os.environ.get("EDGELORA_CACHE_DIR"):
        return Path(os.environ["EDGELORA_CACHE_DIR"])
    home = os.environ.get("EDGELORA_HOME")
    return Path(home) / "cache" if home else Path(platformdirs.user_cache_dir(APP))


@dataclass
class Config:
    default_model: str | None = None
    roles_dirs: list[str] = field(default_factory=list)  # searched after the bundled and user folders
    max_resident_adapters: int = 8
    max_resident_bytes: int = 512 << 20
    kv_cache_bytes: int = 256 << 20
    require_signatures: bool = False
    trusted_keys: list[str] = field(default_factory=list)  # base64 raw ed25519 public keys
    route_threshold: float | None = None  # None: the router's fitted threshold (router.py)
    cpu_extra_buffers: str = "auto"  # llama.cpp weight repacking/AMX: auto (probed per host), on, off
    save_history: bool = True  # false: ask and the chat app save nothing (as --no-log always)
    threads: int | None = None  # CPU threads for generation; None = every core (cpu.py, README 'Threads')
    path: Path | None = None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}


_TYPES = {
    "default_model": (str,),
    "roles_dirs": (list,),
    "max_resident_adapters": (int,),
    "max_resident_bytes": (int,),
    "kv_cache_bytes": (int,),
    "require_signatures": (bool,),
    "trusted_keys": (list,),
    "route_threshold": (float, int),
    "cpu_extra_buffers": (str,),
    "threads": (int,),
    "save_history": (bool,),
}


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    if not path.exists():
        return Config(path=path)
    if not path.is_file():  # a folder or a FIFO (which would block forever): say so, do not ignore it
        raise ConfigError(f"{path}: the config path is not a regular file")
    try:
        data = tomllib.loads(path.read_text("utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    values = {}
    for key, value in data.items():
        if key not in _TYPES:
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join(_TYPES)})")
        types = _TYPES[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ConfigError(f"{path}: '{key}' must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has inf and nan
            raise ConfigError(f"{path}: '{key}' must be a finite number, got {value!r}")
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: '{key}' must be a list of strings")
        values[key] = value
    return Config(**values, path=path)
