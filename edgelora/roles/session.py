"""Roles bound to a running engine: pick roles by name (stacked with weights) or automatically,
and chat with the role's system prompt and sampling defaults. The CLI and the TUI use this."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgelora.config import Config, data_dir, load_config
from edgelora.runtime.engine import Completion, Engine
from edgelora.roles.residency import Registry
from edgelora.roles.manifest import Resolved, Role, RoleAdapter, RoleCatalog, bundled_dir
from edgelora.roles.selection import AUTO, Selection, is_manifest_path, parse_selection  # noqa: F401 (AUTO: also imported from here)
from edgelora.routing.router import Route, route


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
        self.selection = Selection()  # what was asked for: roles with weights, or 'auto'
        self.current = Active(self.catalog.resolve(self.selection))  # what answers (auto: the last routed)

    @property
    def auto(self) -> bool:
        return self.selection.is_auto

    @property
    def specs(self) -> list[str]:
        """The selection as 'name[:W]' strings (``use`` takes them back)."""
        return self.selection.specs

    def select(self, selection: Selection | str | Sequence[str]) -> Active:
        """Switch to a selection (roles/selection.py's grammar: 'name', 'a:0.7+b:0.3', ['a:0.7', 'b:0.3'],
        './x.toml', 'base' or 'auto', decided per prompt). On any error the previous role stays active."""
        selection = parse_selection(selection)
        if selection.is_auto:
            self.selection = selection
            return self.current
        resolved = self.catalog.resolve(selection)  # a manifest path is loaded here
        self.registry.apply(resolved)
        self.selection = _absolute(selection)
        self.current = Active(resolved)
        return self.current

    use = select  # the name the CLI, the TUI and README's Python API have used

    def apply(self, resolved: Resolved) -> Active:
        """Adapters no role selection names (llama-server's per-request lora ids), applied as they are."""
        self.registry.apply(resolved)
        self.selection = Selection(tuple(resolved.roles) or Selection().items)
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
            self.registry.preload(self.catalog.resolve(spec))

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

    # ---------------------------------------------------------------- the steps of a turn (conversation/turn.py)

    def prepare(self, route_text: str) -> Active:
        """The role that answers ``route_text``, its adapters applied: routed now under 'auto'."""
        if self.auto:
            chosen = self.route(route_text)
            resolved = self.catalog.resolve([chosen.role])
            self.registry.apply(resolved)
            self.current = Active(resolved, chosen)
        return self.current

    def messages_for(self, messages: Sequence[dict]) -> list[dict]:
        """What the answering role sees: its ``history`` setting applied, its system prompt first
        unless the conversation has one."""
        msgs = earlier_turns_seen(messages, self.current.resolved.history)
        system = self.current.resolved.system
        if system and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def sampling_for(self, sampling: dict) -> dict:
        """The answering role's sampling defaults, overridden by the values given (None: not given)."""
        return {**self.current.resolved.sampling, **{k: v for k, v in sampling.items() if v is not None}}

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Iterator[str]:
        """The Python API's one call: the same steps as conversation.turn.Turn, with no history."""
        self.prepare(last_user_text(messages))
        return self.engine.stream_chat(self.messages_for(messages), **self.sampling_for(sampling))

    def chat(self, messages: Sequence[dict], **sampling) -> Completion:
        stream = self.stream_chat(messages, **sampling)
        for _ in stream:
            pass
        return stream.completion  # type: ignore[return-value]


def last_user_text(messages: Sequence[dict]) -> str:
    """What 'auto' routes on: the last user message."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def _absolute(selection: Selection) -> Selection:
    """Manifest paths made absolute, so the selection saved in the history means the same file from any folder."""
    if not selection.manifests:
        return selection
    return Selection(tuple((str(Path(n).expanduser().resolve()) if is_manifest_path(n) else n, w)
                           for n, w in selection.items))
