"""`edgelora roles ...`."""

from __future__ import annotations

import json

import click

from edgelora.errors import EdgeloraError
from edgelora.frontends.cli.completion import complete_role
from edgelora.frontends.cli.options import (_catalog, _model_option)


@click.group()
def roles():
    """List, show, add and remove roles (adapter sets with a system prompt and sampling)."""


@roles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the roles and problems as JSON.")
def roles_list(as_json):
    """Every role, where it comes from, and problems found."""
    _, catalog = _catalog()
    rows = [{"name": "base", "description": "the base model with no adapter", "manifest": None, "adapters": []}]
    for role in catalog.roles():
        rows.append({"name": role.name, "description": role.description, "manifest": str(role.path),
                     "adapters": [{"file": str(a.file), "scale": a.scale} for a in role.adapters],
                     "include": [f"{n}:{w:g}" for n, w in role.include]})
    problems = [f"role '{n}' is defined more than once: {', '.join(map(str, p))}" for n, p in catalog.collisions().items()]
    problems += catalog.errors
    if as_json:
        click.echo(json.dumps({"roles": rows, "problems": problems}, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['description']}")
    for p in problems:
        click.echo(f"warning: {p}", err=True)


@roles.command("show")
@click.argument("name", shell_complete=complete_role)
def roles_show(name):
    """One role's manifest, resolved."""
    _, catalog = _catalog()
    role = catalog.get(name)
    click.echo(f"name:        {role.name}")
    click.echo(f"manifest:    {role.path}")
    click.echo(f"description: {role.description}")
    if role.system:
        click.echo(f"system:      {role.system}")
    for a in role.adapters:
        click.echo(f"adapter:     {a.file} (scale {a.scale:g}, sha256 {a.sha256[:16]}…)")
    for n, w in role.include:
        click.echo(f"include:     {n}:{w:g}")
    if role.base_architecture or role.base_sha256:
        click.echo(f"base:        {role.base_architecture or '?'} sha256 {(role.base_sha256 or '?')[:16]}…")
    if role.sampling:
        click.echo(f"sampling:    {', '.join(f'{k}={v}' for k, v in role.sampling.items())}")
    if role.keywords or role.regex or role.examples:
        click.echo(f"routing:     keywords {role.keywords}, regex {role.regex}, {len(role.examples)} examples")


@roles.command("add")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--name", help="Make a role of this name from an adapter .gguf (its sha256 and the base are pinned for you).")
@click.option("--description", help="With --name: the role's description.")
def roles_add(manifest, name, description):
    """Copy a role (manifest and adapter files) into your roles folder, after checking it.
    MANIFEST may also be an adapter .gguf with --name: the manifest is written for you."""
    from edgelora.models.gguf_info import read_gguf, validate_adapter
    from edgelora.models.catalog import resolve_model
    from edgelora.roles.residency import verify_adapter_file
    from edgelora.roles.manifest import adapter_role, load_manifest
    from edgelora.roles.session import user_roles_dir
    from edgelora.roles.store import install_role

    config, catalog = _catalog()
    if not name and manifest.lower().endswith(".gguf"):
        raise EdgeloraError(f"{manifest} is an adapter, not a manifest; add --name NAME to make a role of it")
    role = adapter_role(manifest, name, description, resolve_model(config.default_model)) if name else load_manifest(manifest)
    if role.name in catalog.found or role.name == "base":
        where = ", ".join(map(str, catalog.found.get(role.name, []))) or "built in"
        raise EdgeloraError(f"role '{role.name}' already exists ({where}); "
                            + ("choose another --name" if name else f"rename it in {manifest}"))
    base = read_gguf(resolve_model(config.default_model))
    for adapter in role.adapters:
        verify_adapter_file(adapter, config)
        validate_adapter(adapter.file, base)  # a file with the right sha256 must still be an adapter for this base
    catalog.resolve(role.include)  # included roles exist, within the depth and fan-out bounds
    dest = install_role(role, user_roles_dir())
    click.echo(f"added role '{role.name}' -> {dest}")


@roles.command("train")
@click.argument("name")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="JSONL or TOML of {prompt, answer[, system]} pairs.")
@click.option("--eval", "n_eval", type=click.IntRange(min=0), default=4, show_default=True, help="Pairs held out to check the role.")
@click.option("--rank", type=click.IntRange(1, 256), default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA alpha (scale = alpha / rank).")
@click.option("--targets", default="q_proj,v_proj,o_proj", show_default=True, help="Modules to adapt, comma-separated.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Passes over the training pairs (a fraction trains part of the last pass).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True, help="Learning rate.")
@click.option("--batch", type=click.IntRange(1, 256), default=8, show_default=True, help="Pairs per training step.")
@click.option("--max-length", type=click.IntRange(min=8), default=512, show_default=True, help="Most tokens per pair (prompt + answer).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split and the training.")
@click.option("--description", help="The role's description [default: where it was trained from].")
@click.option("--dry-run", is_flag=True, help="Check the data and print what would be trained and how long it takes.")
@click.option("--force", is_flag=True, help="Replace your role of that name.")
@_model_option
def roles_train(name, data, n_eval, rank, alpha, targets, epochs, lr, batch, max_length, seed, description, dry_run,
                force, model):
    """Train a LoRA role NAME from a file of examples on this CPU, check it, and add it."""
    from edgelora.train.cli import run_train

    run_train(name=name, data=data, n_eval=n_eval, rank=rank, alpha=alpha, targets=targets, epochs=epochs, lr=lr,
              batch=batch, max_length=max_length, seed=seed, description=description, dry_run=dry_run, force=force,
              model=model)


@roles.command("remove")
@click.argument("name", shell_complete=complete_role)
def roles_remove(name):
    """Remove a role you added (bundled roles cannot be removed)."""
    from edgelora.roles.session import user_roles_dir
    from edgelora.roles.store import remove_role

    _, catalog = _catalog()
    role = catalog.get(name)
    if role.path is None or role.path.parent != user_roles_dir().resolve():
        raise EdgeloraError(f"role '{name}' is not in your roles folder ({user_roles_dir()}); it comes from {role.path}")
    remove_role(role)
    click.echo(f"removed role '{name}'")
