"""Role manifests (TOML) and the catalog of roles: bundled, the user's, and extra folders.

A role is one or more adapters with scales, optionally other roles included with weights, plus a
system prompt, sampling defaults and routing hints. Manifests are checked strictly: an unknown key
or a wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import regex

from edgelora._toml import tomllib
from edgelora.errors import EdgeloraError

BASE_ROLE = "base"  # the role with no adapter
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HISTORY_MODES = ("all", "user", "none")  # what a role sees of earlier turns: all, only the user's, nothing
SAMPLING_KEYS = {"temperature": (float, int), "top_p": (float, int), "top_k": (int,), "min_p": (float, int),
                 "repeat_penalty": (float, int), "max_tokens": (int,), "seed": (int,)}


class RoleError(EdgeloraError):
    """A manifest or role reference that cannot be used."""


class UnknownRoleError(RoleError):
    """A role name no manifest defines (the server's 404, and where its fallback role applies)."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class RoleAdapter:
    file: Path  # absolute
    sha256: str
    scale: float = 1.0


@dataclass
class Role:
    name: str
    path: Path | None  # the manifest; None for the built-in base role
    description: str = ""
    system: str | None = None
    adapters: list[RoleAdapter] = field(default_factory=list)
    include: list[tuple[str, float]] = field(default_factory=list)
    base_architecture: str | None = None
    base_sha256: str | None = None
    sampling: dict = field(default_factory=dict)
    keywords: list[str] = field(default_factory=list)
    regex: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    history: str = "all"


BASE = Role(BASE_ROLE, None, description="The base model with no adapter")

_SCHEMA = {
    "": {"name": str, "description": str, "system": str, "include": list, "adapters": list, "base": dict,
         "sampling": dict, "routing": dict, "history": str},
    "adapters": {"file": str, "sha256": str, "scale": (float, int)},
    "base": {"architecture": str, "sha256": str},
    "routing": {"keywords": list, "regex": list, "examples": list},
}


def parse_spec(spec: str) -> tuple[str, float]:
    """'name' or 'name:weight' -> (name, weight). A spec ending in .toml is a manifest path, whole:
    a ':' in its folder names (./a:b/x.toml) is no weight; x.toml:0.5 is weighted."""
    name, sep, weight = spec.rpartition(":")
    if not sep or spec.endswith(".toml"):
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RoleError(f"role '{spec}': the weight after ':' must be a finite number")
    return name, value


def _check(table: dict, schema: dict, where: str, path: Path) -> None:
    for key, value in table.items():
        if key not in schema:
            raise RoleError(f"{path}: unknown key '{where}{key}' (known: {', '.join(schema)})")
        want = schema[key]
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in (want if isinstance(want, tuple) else (want,))):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise RoleError(f"{path}: '{where}{key}' must be {names}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has inf and nan
            raise RoleError(f"{path}: '{where}{key}' must be a finite number, got {value!r}")


def _strings(value: list, key: str, path: Path) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise RoleError(f"{path}: '{key}' must be a list of strings")
    return value


MAX_MANIFEST_BYTES = 1 << 20
MAX_INCLUDE_DEPTH = 16
MAX_EXPANDED = 256  # adapter entries a role spec may expand to, includes counted


def load_manifest(path: str | Path) -> Role:
    path = Path(path).expanduser().resolve()
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block forever, a device never end
            raise RoleError(f"{path}: not a regular file")
        if os.stat(path).st_size > MAX_MANIFEST_BYTES:
            raise RoleError(f"{path}: over {MAX_MANIFEST_BYTES} bytes; not a role manifest")
        data = tomllib.loads(path.read_text("utf-8-sig"))  # a byte-order mark is fine
    except FileNotFoundError:
        raise RoleError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise RoleError(f"{path}: not valid TOML ({exc})") from None
    _check(data, _SCHEMA[""], "", path)
    name = data.get("name")
    if not name:
        raise RoleError(f"{path}: missing key 'name'")
    if not NAME_RE.match(name) or name in (BASE_ROLE, "auto"):
        raise RoleError(f"{path}: 'name' {name!r} is not allowed (letters, digits, '_.-'; not 'base' or 'auto')")
    adapters = []
    for i, entry in enumerate(data.get("adapters", [])):
        if not isinstance(entry, dict):
            raise RoleError(f"{path}: 'adapters[{i}]' must be a table")
        _check(entry, _SCHEMA["adapters"], f"adapters[{i}].", path)
        for key in ("file", "sha256"):
            if key not in entry:
                raise RoleError(f"{path}: missing key 'adapters[{i}].{key}'")
        if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            raise RoleError(f"{path}: 'adapters[{i}].sha256' must be 64 lowercase hex digits")
        adapters.append(RoleAdapter((path.parent / entry["file"]).resolve(), entry["sha256"], float(entry.get("scale", 1.0))))
    try:
        include = [parse_spec(s) for s in _strings(data.get("include", []), "include", path)]
    except RoleError as exc:
        raise RoleError(f"{path}: 'include': {exc}") from None
    if not adapters and not include:
        raise RoleError(f"{path}: a role needs at least one [[adapters]] entry or an 'include'")
    history = data.get("history", "all")
    if history not in HISTORY_MODES:
        raise RoleError(f"{path}: 'history' must be one of {', '.join(map(repr, HISTORY_MODES))}, got {history!r}")
    base = data.get("base", {})
    _check(base, _SCHEMA["base"], "base.", path)
    sampling = data.get("sampling", {})
    _check(sampling, SAMPLING_KEYS, "sampling.", path)
    routing = data.get("routing", {})
    _check(routing, _SCHEMA["routing"], "routing.", path)
    for pattern in _strings(routing.get("regex", []), "routing.regex", path):
        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise RoleError(f"{path}: 'routing.regex' {pattern!r} is not a valid regular expression ({exc})") from None
    return Role(
        name=name,
        path=path,
        description=data.get("description", ""),
        system=data.get("system"),
        adapters=adapters,
        include=include,
        base_architecture=base.get("architecture"),
        base_sha256=base.get("sha256"),
        sampling=dict(sampling),
        keywords=_strings(routing.get("keywords", []), "routing.keywords", path),
        regex=routing.get("regex", []),
        examples=_strings(routing.get("examples", []), "routing.examples", path),
        history=history,
    )


def bundled_dir() -> Path:
    return Path(str(resources.files("edgelora.bundled")))


@dataclass
class Resolved:
    """What a list of role specs comes to: adapters with final scales, a system prompt, sampling."""

    roles: list[tuple[str, float]]
    adapters: list[tuple[RoleAdapter, float, Role]]  # (adapter, scale x weight, owning role)
    system: str | None
    sampling: dict
    history: str = "all"  # the first role's, like its system prompt and sampling

    @property
    def label(self) -> str:
        return " + ".join(n if w == 1.0 else f"{n}:{w:g}" for n, w in self.roles) or BASE_ROLE


class RoleCatalog:
    """Every role found in the given folders (manifests are *.toml). Names must be unique."""

    def __init__(self, folders: list[Path], manifests: list[Path] = ()):
        self.folders = [Path(f) for f in folders]
        self.found: dict[str, list[Path]] = {}
        self.errors: list[str] = []  # manifests that failed to load, reported by `roles list`
        self._roles: dict[Path, Role] = {}
        for folder in self.folders:
            for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
                self._add(path, strict=False)
        self.shadowed: dict[str, list[Path]] = {}  # catalog roles hidden by a manifest given by path
        for path in manifests:
            self._add(Path(path), strict=True, explicit=True)

    def _add(self, path: Path, strict: bool, explicit: bool = False) -> None:
        try:
            role = load_manifest(path)
        except RoleError as exc:
            if strict:
                raise
            self.errors.append(str(exc))
            return
        self._roles[role.path] = role
        if explicit and role.path not in self.found.get(role.name, [role.path]):
            # a path names exactly one file: it wins over a catalog role of the same name
            self.shadowed[role.name] = self.found.pop(role.name)
        paths = self.found.setdefault(role.name, [])
        if role.path not in paths:
            paths.append(role.path)

    def names(self) -> list[str]:
        return sorted(self.found)

    def collisions(self) -> dict[str, list[Path]]:
        return {n: p for n, p in self.found.items() if len(p) > 1}

    def get(self, name: str) -> Role:
        if name == BASE_ROLE:
            return BASE
        paths = self.found.get(name)
        if not paths:
            raise UnknownRoleError(f"unknown role '{name}' (known: {', '.join([BASE_ROLE, *self.names()])})", name)
        if len(paths) > 1:
            raise RoleError(f"role '{name}' is defined more than once: {', '.join(map(str, paths))}; rename one")
        return self._roles[paths[0]]

    def roles(self) -> list[Role]:
        return [self.get(n) for n in self.names() if n not in self.collisions()]

    def resolve(self, specs: list[str] | list[tuple[str, float]]) -> Resolved:
        pairs = [parse_spec(s) if isinstance(s, str) else s for s in specs]
        merged: dict[str, list] = {}  # sha256 -> [adapter, scale, role]
        expanded = 0
        for name, weight in pairs:
            for adapter, scale, role in self._flatten(name, weight, ()):
                expanded += 1
                if expanded > MAX_EXPANDED:  # includes that fan out (each role including the next twice...)
                    raise RoleError(f"role '{name}' expands to more than {MAX_EXPANDED} adapter entries through "
                                    f"its includes; flatten it")
                if adapter.sha256 in merged:
                    merged[adapter.sha256][1] += scale  # the same file twice: one adapter, summed scale
                else:
                    merged[adapter.sha256] = [adapter, scale, role]
        first = self.get(pairs[0][0]) if pairs else BASE
        return Resolved(
            roles=pairs,
            adapters=[tuple(v) for v in merged.values()],  # type: ignore[misc]
            system=first.system,
            sampling=dict(first.sampling),
            history=first.history,
        )

    def _flatten(self, name: str, weight: float, stack: tuple[str, ...]):
        if name in stack:
            raise RoleError(f"role cycle: {' -> '.join((*stack, name))}")
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise RoleError(f"role '{stack[0]}' includes roles more than {MAX_INCLUDE_DEPTH} deep")
        role = self.get(name)
        for adapter in role.adapters:
            yield adapter, adapter.scale * weight, role
        for inner, w in role.include:
            yield from self._flatten(inner, weight * w, (*stack, name))


def adapter_role(adapter: str | Path, name: str, description: str | None, base_path: Path) -> Role:
    """A role of one adapter .gguf at scale 1, its sha256 and the base pinned: `roles add X.gguf --name N`."""
    from edgelora.files import sha256_file
    from edgelora.models.gguf_info import read_gguf, validate_adapter

    path = Path(adapter).expanduser().resolve()
    if not NAME_RE.match(name) or name in (BASE_ROLE, "auto"):
        raise RoleError(f"--name {name!r} is not allowed (letters, digits, '_.-'; not 'base' or 'auto')")
    if not path.is_file():
        raise RoleError(f"{path}: no such file")
    base = read_gguf(base_path)
    validate_adapter(path, base)  # refused here, before anything is written
    return Role(name=name, path=None, description=description or f"adapter {path.name}",
                adapters=[RoleAdapter(path, sha256_file(path), 1.0)], base_architecture=base.architecture,
                base_sha256=sha256_file(base_path))
