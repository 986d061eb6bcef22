"""`edgelora adapters ...`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgelora.errors import EdgeloraError
from edgelora.frontends.cli.options import _catalog


@click.group()
def adapters():
    """Verify, sign and pull adapters."""


@adapters.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list: role, file, status.")
def adapters_verify(as_json):
    """Check every known adapter against its manifest's sha256 (and signature)."""
    from edgelora.roles.residency import verify_catalog

    config, catalog = _catalog()
    report = verify_catalog(config, catalog.roles())
    for name, paths in catalog.collisions().items():  # a role defined twice is a problem, not skipped
        report += [(name, p, f"role '{name}' is defined more than once: {', '.join(map(str, paths))}") for p in paths]
    report += [("?", Path(e.split(":", 1)[0]), e) for e in catalog.errors]  # manifests that do not load
    bad = [r for r in report if r[2] != "ok"]
    if as_json:
        click.echo(json.dumps([{"role": r, "file": str(f), "status": st} for r, f, st in report], indent=2))
    else:
        for role, file, status in report:
            click.echo(f"{'ok ' if status == 'ok' else 'BAD'}  {role:<12} {file}" + ("" if status == "ok" else f"  {status}"))
    if bad:
        raise EdgeloraError(f"{len(bad)} of {len(report)} adapters failed verification")


@adapters.command("keygen")
@click.argument("private_key", type=click.Path(dir_okay=False))
def adapters_keygen(private_key):
    """Make an ed25519 signing key; prints the public key to add to trusted_keys."""
    from edgelora.safety.signing import keygen

    click.echo(keygen(Path(private_key)))


@adapters.command("sign")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "private_key", required=True, type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
def adapters_sign(file, private_key):
    """Write FILE.sig, an ed25519 signature of FILE."""
    from edgelora.safety.signing import sign

    click.echo(f"wrote {sign(Path(file), Path(private_key))}")


@adapters.command("pull")
@click.argument("repo")
@click.option("--name", help="Role name for it (default: the repository's name).")
@click.option("--revision", help="Branch, tag or commit.")
@click.option("-m", "--model", help="Base to convert against (default: the configured or embedded default).")
def adapters_pull(repo, name, revision, model):
    """Fetch a PEFT or GGUF LoRA from the Hugging Face Hub and make it a role."""
    from edgelora.roles.hub import pull_adapter

    config, catalog = _catalog()
    role_path = pull_adapter(repo, name=name, revision=revision, model=model or config.default_model, catalog=catalog)
    click.echo(f"added role from {repo}: {role_path}")
