"""Models and adapters from the Hugging Face Hub, only when the user asks (`pull`).

huggingface_hub does the work: its cache, its progress bars, HF_HUB_OFFLINE. A pulled PEFT adapter
is converted against the current base and cached by (source hash, base hash); a pulled GGUF adapter
is validated against the base. Either becomes a role in the user's roles folder."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from edgelora.config import cache_dir
from edgelora.convert import ConvertError, convert_peft
from edgelora.convert.peft_source import CONFIG, WEIGHTS, sha256_file
from edgelora.errors import EdgeloraError
from edgelora.models.gguf_info import read_gguf, validate_adapter
from edgelora.models.catalog import resolve_model
from edgelora.roles.residency import cached_sha256
from edgelora.roles.manifest import NAME_RE, Role, RoleAdapter, RoleCatalog
from edgelora.roles.session import user_roles_dir
from edgelora.roles.store import install_role


class HubError(EdgeloraError):
    pass


def _hub():
    import huggingface_hub

    return huggingface_hub


REACH_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached now (None if it can, or if HF_HUB_OFFLINE says not to try).
    One quick connection instead of huggingface_hub's retries (about 28 s with no network)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot reach the Hugging Face Hub at {host}:{port} ({exc.strerror or exc}): no network?"
    return None


def _offline_or_cached(why: str, fetch):
    """No network: the local cache only (huggingface_hub's local_files_only), else one clear line."""
    try:
        return fetch(local_files_only=True)
    except Exception:
        raise HubError(f"{why} It is not in the local cache either; retry online, or use HF_HUB_OFFLINE=1 "
                       "with files already cached") from None


def pull_model(repo: str, file: str | None = None, *, revision: str | None = None) -> Path:
    hub = _hub()
    why = hub_unreachable()
    if why is not None:
        if file is None:
            raise HubError(f"{why} Name the file to look for it in the local cache: models pull {repo} FILE.gguf")
        return Path(_offline_or_cached(why, lambda **kw: hub.hf_hub_download(repo, file, revision=revision, **kw)))
    try:
        if file is None:
            ggufs = [f for f in hub.list_repo_files(repo, revision=revision) if f.endswith(".gguf")]
            if len(ggufs) != 1:
                raise HubError(f"{repo} has {len(ggufs)} GGUF files; name one: {', '.join(ggufs[:20])}")
            file = ggufs[0]
        return Path(hub.hf_hub_download(repo, file, revision=revision))
    except HubError:
        raise
    except Exception as exc:  # offline, not found, auth: huggingface_hub's own message
        raise HubError(f"cannot pull {repo}{'/' + file if file else ''}: {exc}".splitlines()[0]) from None


def pull_adapter(repo: str, *, name: str | None = None, revision: str | None = None, model=None,
                 catalog: RoleCatalog | None = None) -> Path:
    hub = _hub()
    role_name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", repo.split("/")[-1])
    if not NAME_RE.match(role_name):
        raise HubError(f"--name {role_name!r} is not a valid role name")
    if catalog is not None and role_name in catalog.found:
        raise HubError(f"role '{role_name}' already exists ({catalog.found[role_name][0]}); pass --name")
    patterns = ["*.json", "*.safetensors", "*.gguf", "*.sig"]
    why = hub_unreachable()
    try:
        if why is not None:
            folder = Path(_offline_or_cached(why, lambda **kw: hub.snapshot_download(
                repo, revision=revision, allow_patterns=patterns, **kw)))
        else:
            folder = Path(hub.snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except HubError:
        raise
    except Exception as exc:
        raise HubError(f"cannot pull {repo}: {exc}".splitlines()[0]) from None
    base_path = resolve_model(model)
    base = read_gguf(base_path)
    if (folder / CONFIG).exists():
        adapter = _converted(folder, base_path, role_name)
        description = f"PEFT adapter {repo}, converted"
    else:
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) != 1:
            raise HubError(f"{repo} has no {CONFIG} and {len(ggufs)} GGUF files; expected a PEFT folder or one GGUF adapter")
        adapter = ggufs[0]
        description = f"GGUF adapter {repo}"
    validate_adapter(adapter, base)
    role = Role(
        name=role_name, path=None, description=description,
        adapters=[RoleAdapter(adapter.resolve(), sha256_file(adapter), 1.0)],
        base_architecture=base.architecture, base_sha256=cached_sha256(base_path),
    )
    return install_role(role, user_roles_dir())


def _converted(folder: Path, base_path: Path, name: str) -> Path:
    """Convert once per (source, base): the result is cached under the user cache folder."""
    source = sha256_file(folder / WEIGHTS) if (folder / WEIGHTS).exists() else "missing"
    key = f"{source[:16]}-{sha256_file(folder / CONFIG)[:8]}-{cached_sha256(base_path)[:16]}"
    out = cache_dir() / "converted" / f"{key}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            convert_peft(folder, base_path, out, name=name)
        except ConvertError as exc:
            raise HubError(str(exc)) from None
    return out
