"""The `edgelora roles train` command's body (the click options live in edgelora/cli.py)."""

from __future__ import annotations

import click

from edgelora.train.data import load_examples, split
from edgelora.train.role import (Result, TrainError, TrainOptions, check_name, check_options, missing_packages, INSTALL_HINT,
                   train_role)


def run_train(*, name: str, data: str, targets: str, model: str | None, **options) -> None:
    from edgelora.config import load_config
    from edgelora.runtime.engine import Engine
    from edgelora.roles.manifest import RoleCatalog
    from edgelora.roles.session import default_folders, user_roles_dir

    config = load_config()
    opts = TrainOptions(name=name, data=data, targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                        threads=config.threads, **options)  # the engine's threads, so a rerun is the same adapter
    catalog = RoleCatalog(default_folders(config))
    roles_dir = user_roles_dir()
    # The quick refusals first: a bad file, a taken name, no torch; none of them loads a model.
    split(load_examples(opts.data), opts.n_eval, opts.seed)
    check_name(name, catalog, roles_dir, opts.force)
    check_options(opts)
    missing = [] if opts.dry_run else missing_packages()
    if missing:
        raise TrainError(f"training needs {', '.join(missing)}: {INSTALL_HINT}")
    engine = Engine(model or config.default_model, n_ctx=None, n_threads=config.threads)
    try:
        result = train_role(opts, engine, catalog, roles_dir)
    finally:
        engine.close()
    if isinstance(result, Result):
        loss = f"loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}" if result.losses else ""
        click.echo(f"added role '{name}' -> {result.manifest} ({result.steps} steps, {loss}; training "
                   f"{result.train_s:.0f} s, all {result.total_s:.0f} s)")
        click.echo(f"try it: edgelora ask --role {name} \"...\"")
