"""Where adapters come from and which stay in memory: integrity (sha256 pins, optional
signatures), base compatibility, and an LRU of resident adapters bounded by count and bytes.
Active adapters are pinned; eviction detaches, then frees."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from edgelora.config import Config
from edgelora.runtime.engine import Engine
from edgelora.errors import AdapterError, EdgeloraError
from edgelora.roles.manifest import BASE_ROLE, Resolved, Role, RoleAdapter
from edgelora.safety.admission import IntegrityError, cached_sha256, check_regular_file, verify_file  # noqa: F401  (re-exported)


class CompatibilityError(AdapterError):
    """A role made for another base model."""


def verify_adapter_file(adapter: RoleAdapter, config: Config) -> None:
    """sha256 pin and signature, checked before the file is parsed (admission.verify_file)."""
    verify_file(adapter.file, adapter.sha256, config)


class Registry:
    def __init__(self, engine: Engine, config: Config | None = None, *, force: bool = False):
        self.engine = engine
        self.config = config or Config()
        self.force = force  # accept roles made for another base (the shape checks still run)
        self._lru: OrderedDict[str, str] = OrderedDict()  # sha256 -> engine adapter name, oldest first
        self._base_sha: str | None = None

    # -------------------------------------------------------------- checks

    @property
    def base_sha256(self) -> str:
        if self._base_sha is None:
            self._base_sha = cached_sha256(self.engine.model_path)
        return self._base_sha

    def check_base(self, role: Role) -> None:
        why = self.base_mismatch(role)
        if why is not None:
            raise CompatibilityError(f"{role.path}: role '{role.name}' {why}")

    def base_mismatch(self, role: Role) -> str | None:
        """Why ``role`` does not fit the loaded base (its pinned architecture or base sha256), or None."""
        if role.name == BASE_ROLE or self.force:
            return None
        arch = self.engine.architecture
        if role.base_architecture and role.base_architecture != arch:
            return f"was made for a {role.base_architecture} base; the loaded base is {arch} (--force to try anyway)"
        if role.base_sha256 and role.base_sha256 != self.base_sha256:
            return (f"was made for base sha256 {role.base_sha256[:16]}…, the loaded base "
                    f"{self.engine.model_path.name} is {self.base_sha256[:16]}… (--force to try anyway; shapes are still checked)")
        return None

    # -------------------------------------------------------------- residency

    @property
    def resident_bytes(self) -> int:
        return sum(a.size for a in self.engine.resident.values())

    def is_resident(self, adapter: RoleAdapter) -> bool:
        return adapter.sha256 in self._lru

    def engine_name(self, adapter: RoleAdapter) -> str | None:
        """The engine's name for this file: the first role that loaded it names it, shared by all."""
        return self._lru.get(adapter.sha256)

    def ensure(self, adapter: RoleAdapter, role: Role) -> str:
        """Make an adapter resident (verify, validate, load) and return its engine name."""
        name = self._lru.get(adapter.sha256)
        if name is not None and name in self.engine.resident:
            self._lru.move_to_end(adapter.sha256)
            return name
        name = role.name if len(role.adapters) == 1 else f"{role.name}.{adapter.file.stem}"
        held = self.engine.resident.get(name)
        if held is not None and held.path.resolve() == adapter.file.resolve() and held.sha256 == adapter.sha256:
            self._lru[adapter.sha256] = name  # loaded by another Roles on this engine: adopt it
            return name
        if held is not None:
            name = f"{name}@{adapter.sha256[:8]}"
        self.engine.load(adapter.file, name, sha256=adapter.sha256, force=self.force, config=self.config)  # pin + signature + checks
        self._lru[adapter.sha256] = name
        return name

    def apply(self, resolved: Resolved) -> dict[str, float]:
        """Load what is missing, then switch the engine to exactly this set in one step."""
        for _, _, role in resolved.adapters:
            self.check_base(role)
        scales = {self.ensure(adapter, role): scale for adapter, scale, role in resolved.adapters}
        self.engine.set_adapters(scales)
        self.evict()
        return scales

    def preload(self, resolved: Resolved) -> None:
        for adapter, _, role in resolved.adapters:
            self.check_base(role)
            self.ensure(adapter, role)
        self.evict()

    def release(self, adapter: RoleAdapter) -> bool:
        """Free one resident adapter now, unless it is active. Returns whether it was freed."""
        name = self._lru.get(adapter.sha256)
        if name is None or name in self.engine.active:
            return False
        del self._lru[adapter.sha256]
        self.engine.free(name)
        return True

    def evict(self) -> list[str]:
        """Free least-recently-used inactive adapters until within the count and byte budgets."""
        freed = []
        active = self.engine.active
        while len(self._lru) > self.config.max_resident_adapters or self.resident_bytes > self.config.max_resident_bytes:
            victim = next((sha for sha, name in self._lru.items() if name not in active), None)
            if victim is None:
                break  # everything left is active (pinned)
            name = self._lru.pop(victim)
            self.engine.free(name)
            freed.append(name)
        return freed


def verify_catalog(config: Config, roles: list[Role]) -> list[tuple[str, Path, str]]:
    """(role, file, 'ok' or the problem) for every adapter of every role."""
    report = []
    for role in roles:
        for adapter in role.adapters:
            try:
                verify_adapter_file(adapter, config)
                status = "ok"
            except EdgeloraError as exc:
                status = str(exc)
            report.append((role.name, adapter.file, status))
    return report
