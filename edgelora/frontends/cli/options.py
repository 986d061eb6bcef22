"""Options and spec helpers shared by the commands."""

from __future__ import annotations


import click

from edgelora.frontends.cli.completion import complete_model


EXIT_USER_ERROR = 2


def parse_spec(spec: str, flag: str) -> tuple[str, float]:
    """'PATH[:SCALE]' -> (PATH, SCALE). A suffix that is not a number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _model_option(f):
    return click.option("-m", "--model", metavar="MODEL", shell_complete=complete_model, help="GGUF path or catalog name (default: embedded SmolLM2).")(f)


def _engine_options(f):
    f = click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log.")(f)
    f = click.option("--threads", "n_threads", type=int, default=None, help="CPU threads (default: config `threads`, else every core).")(f)
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


def _spec_name(spec: str) -> str:
    """The role or manifest path of 'x:WEIGHT', by the one grammar roles use (-0.5 and 1e0 are weights too)."""
    from edgelora.roles.manifest import parse_spec as parse_role_spec

    return parse_role_spec(spec)[0]


def _role_stack(specs, flag: str) -> list[str]:
    """Role specs stacked as `ask --role` takes them: a manifest path becomes its role's name, a role
    given twice is refused (its weight would be summed past what was asked)."""
    specs = [_role_name(s, None) for s in specs]
    names = [_spec_name(s) for s in specs]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise click.BadParameter(f"role '{dup}' is given twice; give it once with its weight (e.g. {dup}:0.5)",
                                 param_hint=flag)
    return specs


def _role_name(spec: str, roles) -> str:
    """A manifest path in --role becomes the name of the role it defines."""
    path = _spec_name(spec)
    if path.endswith(".toml"):
        from edgelora.roles.manifest import load_manifest

        return load_manifest(path).name + spec[len(path):]  # its ':WEIGHT' as given
    return spec


def _catalog(extra=()):
    from edgelora.config import load_config
    from edgelora.roles.manifest import RoleCatalog
    from edgelora.roles.session import default_folders

    config = load_config()
    return config, RoleCatalog(default_folders(config), manifests=list(extra))
