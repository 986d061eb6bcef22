"""Options and spec helpers shared by the commands."""

from __future__ import annotations


import click

from edgelora.frontends.cli.completion import complete_model


EXIT_USER_ERROR = 2


def _model_option(f):
    return click.option("-m", "--model", metavar="MODEL", shell_complete=complete_model, help="GGUF path or catalog name (default: embedded SmolLM2).")(f)


def _engine_options(f):
    f = click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log.")(f)
    f = click.option("--threads", "n_threads", type=int, default=None, help="Pin the CPU thread count (default: config `threads`, else adaptive: README 'Threads on a busy machine').")(f)
    f = click.option("--ctx", "n_ctx", type=int, default=None, help="Context size in tokens [default: 2048, or less if the model was trained for less].")(f)
    f = click.option(
        "--n-gpu-layers", "n_gpu_layers", type=click.IntRange(min=-1), default=0, show_default=True,
        help="Layers to offload to the GPU (-1 = all, 0 = pure CPU).",
    )(f)
    return _model_option(f)


def _unique_name(eng, stem: str) -> str:
    name, i = stem, 2
    while name in eng.resident:
        name, i = f"{stem}-{i}", i + 1
    return name


def role_selection(specs, flag: str):
    """Role specs as `ask --role` takes them (repeated flags stack) -> one Selection, by the one
    grammar (roles/selection.py); a bad one is a usage error naming the flag."""
    from edgelora.errors import SelectionError
    from edgelora.roles.selection import parse_selection

    try:
        return parse_selection(list(specs))
    except SelectionError as exc:
        raise click.BadParameter(str(exc), param_hint=flag) from None


def _catalog(extra=()):
    from edgelora.config import load_config
    from edgelora.roles.manifest import RoleCatalog
    from edgelora.roles.session import default_folders

    config = load_config()
    return config, RoleCatalog(default_folders(config), manifests=list(extra))
