"""Shell completion for role and model names (click's `shell_complete` callbacks).

They run on every Tab press, so they read only manifests and the model catalog, never load a model,
and never fail: a broken config means no suggestions, not a traceback in the user's shell.
Enable with `eval "$(_EDGELORA_COMPLETE=bash_source edgelora)"` (zsh_source, fish_source likewise)."""

from __future__ import annotations

from click.shell_completion import CompletionItem


def role_names() -> list[str]:
    """'base', 'auto' and every role in the bundled, user and configured roles folders."""
    from edgelora.config import load_config
    from edgelora.roles.manifest import RoleCatalog
    from edgelora.roles.session import default_folders

    return ["base", "auto", *RoleCatalog(default_folders(load_config())).names()]


def model_names() -> list[str]:
    """Catalog names and the GGUFs an offline bundle placed in the models folder."""
    from edgelora.models.catalog import catalog, models_dir

    folder = models_dir()
    placed = sorted(p.stem for p in folder.glob("*.gguf")) if folder.is_dir() else []
    return [*catalog(), *placed]


def _matching(names, incomplete: str, prefix: str = "") -> list[CompletionItem]:
    return [CompletionItem(prefix + n) for n in dict.fromkeys(names) if n.startswith(incomplete)]


def complete_role(ctx, param, incomplete: str) -> list[CompletionItem]:
    """Role names; in a stack ('a:0.7+pi') the part after the last '+'; nothing once a weight is typed."""
    head, plus, last = incomplete.rpartition("+")
    if ":" in last:
        return []
    try:
        return _matching(role_names(), last, head + plus)
    except Exception:  # noqa: BLE001 - completion must never break the shell
        return []


def complete_model(ctx, param, incomplete: str) -> list[CompletionItem]:
    """Model names, plus file completion (a model may be a GGUF path)."""
    try:
        names = _matching(model_names(), incomplete)
    except Exception:  # noqa: BLE001 - completion must never break the shell
        names = []
    return [*names, CompletionItem(incomplete, type="file")]
