"""Roles bound to a running engine: pick roles by name (stacked with weights) or automatically,
and chat with the role's system prompt and sampling defaults. The CLI and the TUI use this."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgelora.config import Config, data_dir, load_config
from edgelora.runtime.engine import Completion, Engine
from edgelora.roles.residency import Registry
from edgelora.roles.manifest import BASE_ROLE, Resolved, Role, RoleAdapter, RoleCatalog, bundled_dir
from edgelora.routing.router import Route, route

AUTO = "auto"


def user_roles_dir() -> Path:
    return data_dir() / "roles"


def default_folders(config: Config) -> list[Path]:
    return [bundled_dir(), user_roles_dir(), *(_expand(p, config) for p in config.roles_dirs)]


def _expand(folder: str, config: Config) -> Path:
    try:
        return Path(folder).expanduser()
    except RuntimeError as exc:  # '~nosuchuser/x'
        from edgelora.config import ConfigError

        raise ConfigError(f"{config.path}: roles_dirs entry {folder!r}: {exc}") from None


@dataclass
class Active:
    resolved: Resolved
    route: Route | None = None

    @property
    def label(self) -> str:
        return self.resolved.label


def adapter_label(adapter: RoleAdapter, role: Role) -> str:
    """How an adapter of a role is shown: the role's name (its file's stem too when it has several)."""
    return role.name if len(role.adapters) == 1 else f"{role.name}.{adapter.file.stem}"


def earlier_turns_seen(messages: Sequence[dict], history: str) -> list[dict]:
    """What a role's ``history`` setting lets it see: 'all' turns, only the 'user' turns before the last
    prompt, or 'none' (a fresh context). System messages and the last prompt are always kept."""
    msgs = list(messages)
    if history == "all":
        return msgs
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=len(msgs))
    keep = ("system", "user") if history == "user" else ("system",)
    return [m for i, m in enumerate(msgs) if i >= last or m.get("role") in keep]


class Roles:
    """>>> roles = Roles(Engine()); roles.use("pirate"); roles.chat([{"role": "user", "content": "hi"}])"""

    def __init__(self, engine: Engine, config: Config | None = None, *, extra: Sequence[Path] = (),
                 force: bool = False, catalog: RoleCatalog | None = None):
        self.engine = engine
        self.config = config or load_config()
        self.catalog = catalog or RoleCatalog(default_folders(self.config), manifests=list(extra))
        self.registry = Registry(engine, self.config, force=force)
        self.specs: list[str] = [BASE_ROLE]
        self.current = Active(self.catalog.resolve([BASE_ROLE]))

    @property
    def auto(self) -> bool:
        return self.specs == [AUTO]

    def use(self, specs: str | Sequence[str]) -> Active:
        """Switch to role(s): 'name', ['a:0.7', 'b:0.3'], 'base' or 'auto' (decided per prompt).
        On any error the previous role stays active."""
        specs = [specs] if isinstance(specs, str) else list(specs) or [BASE_ROLE]
        if specs == [AUTO]:
            self.specs = specs
            return self.current
        resolved = self.catalog.resolve(specs)
        self.registry.apply(resolved)
        self.specs = specs
        self.current = Active(resolved)
        return self.current

    def adapter_report(self) -> list[dict]:
        """The engine's active adapters, each named after the selected role that uses it. Roles sharing
        one file share one loaded adapter, named after whichever loaded it first: never show that name."""
        shown = {self.registry.engine_name(adapter): adapter_label(adapter, role)
                 for adapter, _, role in self.current.resolved.adapters}
        return [{**entry, "name": shown.get(entry["name"], entry["name"])} for entry in self.engine.adapter_report()]

    def preload(self, specs: Sequence[str]) -> None:
        for spec in specs:
            self.registry.preload(self.catalog.resolve([spec]))

    def route(self, prompt: str) -> Route:
        """Choose among the roles that fit the loaded base; say so when the best match did not."""
        roles = self.catalog.roles()
        misfits = {r.name: why for r in roles if (why := self.registry.base_mismatch(r)) is not None}
        chosen = route(prompt, [r for r in roles if r.name not in misfits], self.config.route_threshold)
        if misfits:
            unfiltered = route(prompt, roles, self.config.route_threshold)
            if unfiltered.role in misfits:
                why = misfits[unfiltered.role].split(" (--force")[0]
                return Route(chosen.role, f"{chosen.reason}; skipped '{unfiltered.role}' ({unfiltered.reason}): "
                                          f"it {why}", chosen.score)
        return chosen

    def _prepare(self, messages: Sequence[dict], sampling: dict) -> tuple[list[dict], dict]:
        if self.auto:
            last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
            chosen = self.route(last)
            resolved = self.catalog.resolve([chosen.role])
            self.registry.apply(resolved)
            self.current = Active(resolved, chosen)
        msgs = earlier_turns_seen(messages, self.current.resolved.history)
        system = self.current.resolved.system
        if system and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        merged = {**self.current.resolved.sampling, **{k: v for k, v in sampling.items() if v is not None}}
        return msgs, merged

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Iterator[str]:
        msgs, merged = self._prepare(messages, sampling)
        return self.engine.stream_chat(msgs, **merged)

    def chat(self, messages: Sequence[dict], **sampling) -> Completion:
        for _ in self.stream_chat(messages, **sampling):
            pass
        return self.engine.last  # type: ignore[return-value]
