"""The user's config file (TOML, in the platformdirs config folder) and the user's folders."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import platformdirs

from edgelora._toml import tomllib
from edgelora.errors import EdgeloraError

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
    fallback_role: str | None = None  # `serve`: the role answering unknown model names (None: 404)
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
    "fallback_role": (str,),
}


# One line each, written above the key by `config show` and `config init`.
_HELP = {
    "default_model": "base model when no -m is given: a path, a catalog name (`edgelora models list`) or NAME in the models folder",
    "roles_dirs": "more folders of role manifests, searched after the bundled and user folders",
    "max_resident_adapters": "adapters kept loaded at once (least recently used leave first)",
    "max_resident_bytes": "bytes of adapters kept loaded at once",
    "kv_cache_bytes": "KV states kept for switching back to a role without re-reading the conversation; 0 = off",
    "require_signatures": "refuse adapters without a signature by a trusted key",
    "trusted_keys": "base64 raw ed25519 public keys (`edgelora adapters keygen`)",
    "route_threshold": "least similarity for --role auto to pick a role (unset: the fitted default)",
    "cpu_extra_buffers": "llama.cpp weight repacking/AMX: auto (probed per host), on, off",
    "save_history": "false: ask and the chat app save nothing",
    "threads": "CPU threads for generation (unset: edgelora's default)",
    "fallback_role": "serve: the role that answers model names no role has, e.g. gpt-4o-mini (unset: 404)",
}
# What an unset key is shown as, commented out: an example of the value's form.
_EXAMPLES = {"default_model": "gemma3-270m", "route_threshold": 0.14, "threads": 2, "fallback_role": "base"}


def toml_value(value) -> str:
    """A config value as TOML (str, int, float, bool or a list of strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False)  # TOML basic strings and arrays accept JSON's form


def config_text(cfg: Config | None = None) -> str:
    """The config as valid TOML: set keys as values, unset ones (None) as commented examples, each
    with a one-line comment. With no ``cfg``, the defaults (what `config init` writes)."""
    cfg = cfg or Config()
    lines = ["# edgelora config (TOML). Unset keys are commented out; remove the '#' to set one."]
    for key, value in cfg.as_dict().items():
        lines += ["", f"# {_HELP[key]}"]
        if value is None:
            lines.append(f"# {key} = {toml_value(_EXAMPLES[key])}")
        else:
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def init_config(path: Path, *, force: bool = False) -> Path:
    """Write the commented default config to ``path`` (temp file, then rename); refuse to overwrite."""
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it with the defaults")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: the config path is not a regular file")
    from edgelora.convert.errors import ConvertError
    from edgelora.convert.outputs import atomic_output  # temp then rename; no temp left when it fails

    text = config_text()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(text, "utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    except ConvertError as exc:
        raise ConfigError(str(exc)) from None
    return path


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


def edit_config(path: Path) -> Config:
    """Open ``path`` in $VISUAL or $EDITOR (writing the defaults first if it is missing), then read it
    back, so a mistake is reported now rather than by the next command."""
    import shlex
    import subprocess

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        raise ConfigError(f"set $VISUAL or $EDITOR to edit {path} (or edit that file yourself)")
    if not path.exists():
        init_config(path)
    try:
        code = subprocess.call([*shlex.split(editor), str(path)])
    except (OSError, ValueError) as exc:
        raise ConfigError(f"editor {editor!r} (from $VISUAL/$EDITOR) did not start: {exc}") from None
    if code != 0:
        raise ConfigError(f"editor {editor!r} exited with status {code}; {path} is as the editor left it")
    return load_config(path)
