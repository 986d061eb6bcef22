"""`inspect`, `convert`, `export` and `bundle`: commands that read or write files."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from edgelora.errors import EdgeloraError
from edgelora.frontends.cli.completion import complete_role
from edgelora.frontends.cli.options import (_model_option, _role_stack, _spec_name)


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor and its shape.")
@click.option("--metadata", "show_metadata", is_flag=True, help="Also list every metadata key.")
@click.option("--json", "as_json", is_flag=True, help="Print everything (metadata, tensors) as one JSON object.")
def inspect(file, show_tensors, show_metadata, as_json):
    """What a GGUF file is (model or adapter): type, architecture, rank, alpha, targets, size."""
    from edgelora.models.gguf_info import read_gguf

    info = read_gguf(file)
    report = {
        "path": str(info.path),
        "size_bytes": info.size,
        "metadata": {k: v for k, v in info.metadata.items() if not k.startswith("tokenizer.chat_template")},
        "tensors": {k: list(v) for k, v in info.tensors.items()},
    }
    if info.metadata.get("general.type") == "adapter":
        ranks = sorted({ne[0] for n, ne in info.tensors.items() if n.endswith(".lora_b")})
        report["adapter"] = {
            "alpha": info.metadata.get("adapter.lora.alpha"),
            "ranks": ranks,
            "targets": len([n for n in info.tensors if n.endswith(".lora_a")]),
            "converted_for": {k.split(".", 1)[1]: v for k, v in info.metadata.items() if k.startswith(("edgelora.base", "edgelora.source"))},
        }
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    from edgelora.models.gguf_summary import summarize

    for key, value in summarize(info):
        click.echo(f"{key + ':':<15}{value}")
    if show_metadata:
        click.echo("metadata:")
        for k, v in report["metadata"].items():
            click.echo(f"  {k} = {v}")
    if show_tensors:
        click.echo("tensors:")
        for k, v in report["tensors"].items():
            click.echo(f"  {k:<40} {' x '.join(map(str, v))}")


@click.command()
@click.argument("peft_dir", type=click.Path())
@click.option("--base", metavar="BASE.gguf", help="Base GGUF to convert against (default: the embedded default base).")
@click.option("-o", "--output", "out", metavar="OUT.gguf", help="Output file (default: <PEFT_DIR name>.gguf here).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True, help="Tensor type written.")
@click.option("--name", help="general.name of the adapter (default: the folder's name).")
@click.option("--dry-run", is_flag=True, help="Print the tensor plan and write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing -o file that is not a GGUF adapter.")
def convert(peft_dir, base, out, outtype, name, dry_run, force):
    """Convert a Hugging Face PEFT LoRA folder into a GGUF LoRA adapter (no torch)."""
    from edgelora.convert import ConvertError, plan_conversion, write_plan
    from edgelora.models.catalog import resolve_model

    base_path = resolve_model(base)
    try:
        plan = plan_conversion(peft_dir, base_path, outtype=outtype, name=name)
        if dry_run:
            click.echo(plan.describe())
            return
        target = Path(out) if out else Path(f"{Path(peft_dir).resolve().name}.gguf")
        write_plan(plan, target, progress=sys.stderr.isatty(), force=force)
    except ConvertError as exc:
        raise EdgeloraError(str(exc)) from None
    click.echo(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB, {len(plan.tensors)} LoRA pairs, alpha {plan.alpha:g})")


@click.command()
@click.argument("role_specs", nargs=-1, required=True, metavar="ROLE...", shell_complete=complete_role)
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="Folder to write (created if missing).")
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True, help="Output format.")
@click.option("--hf-base", metavar="PATH_OR_REPO", help="The base in Hugging Face form, for vLLM (default: the repository the GGUF names).")
@click.option("--role-dir", "role_dirs", multiple=True, type=click.Path(file_okay=False), help="Extra roles folder (repeatable).")
@click.option("--force", is_flag=True, help="Replace files and PEFT folders in --to that an earlier export did not write.")
@_model_option
def export(role_specs, to, fmt, hf_base, role_dirs, force, model):
    """Roles -> PEFT LoRA folders, roles.json and a vLLM launch script (ROLE: a name, a manifest path, or a stack a:0.7+b:0.3)."""
    from edgelora.config import load_config
    from edgelora.export.vllm import export_roles, split_stack
    from edgelora.models.catalog import resolve_model
    from edgelora.roles.manifest import RoleCatalog
    from edgelora.roles.session import default_folders

    parts = [split_stack(spec) for spec in role_specs]
    manifests = [Path(_spec_name(p)) for stack in parts for p in stack if _spec_name(p).endswith(".toml")]
    specs = ["+".join(_role_stack(stack, "ROLE")) for stack in parts]  # the rules `ask --role` applies
    config = load_config()
    catalog = RoleCatalog([*default_folders(config), *map(Path, role_dirs)], manifests=manifests)
    base_path = resolve_model(model or config.default_model)
    doc = export_roles(specs, Path(to), catalog, base_path, hf_base=hf_base, force=force,
                       progress=lambda msg: click.echo(msg, err=True))
    for name, role in doc["roles"].items():
        click.echo(f"{name:<24} {Path(to) / role['adapter']}  rank {role['rank']}  ({role['method']})")
    hf = doc["base"]["hf"]
    click.echo(f"wrote {Path(to) / 'roles.json'} and {Path(to) / 'launch-vllm.sh'}; HF base: "
               + (f"{hf} (from {doc['base']['hf_from']})" if hf else "unknown: set HF_BASE or pass --hf-base"))


@click.command()
@click.argument("out", type=click.Path())
@click.option("-m", "--model", "models", multiple=True, metavar="NAME|PATH",
              help="Base model to carry (repeatable; catalog name or GGUF path) [default: the embedded default].")
@click.option("--role", "roles", multiple=True, metavar="NAME",
              help="Role to carry, with the roles it includes (repeatable) [default: all of yours; bundled roles always travel].")
@click.option("--python", metavar="3.X", help="Python version of the target [default: this one's].")
@click.option("--find-links", multiple=True, metavar="DIR", help="Extra folder of wheels to take wheels from (repeatable).")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier bundle (nothing else is replaced).")
@click.option("--sign", metavar="KEY.pem", help="Sign SHA256SUMS with this ed25519 key (`adapters keygen`); "
              "install.sh --trust KEY.pub checks it.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def bundle(out, models, roles, python, find_links, force, sign, as_json):
    """Write an offline bundle to OUT (a folder; OUT.tar.gz writes an archive): wheels, models, roles,
    SHA256SUMS and install.sh. Copy it to a machine with no network and run `sh install.sh` there."""
    from edgelora.offline.build import build_bundle, install_hint

    t0 = time.perf_counter()
    result = build_bundle(out, models=models, roles=roles, python=python, find_links=find_links, force=force, sign=sign,
                          progress=lambda msg: click.echo(f"[{time.perf_counter() - t0:6.1f} s] {msg}", err=True))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    roles_text = ", ".join([*result["roles"]["bundled"], *(r["name"] for r in result["roles"]["user"])]) or "none"
    click.echo(f"wrote {result['path']}: {result['size_bytes'] / 1e6:.0f} MB, {len(result['wheels'])} wheels, "
               f"models {', '.join(m['name'] for m in result['models'])}, roles {roles_text} "
               f"(Python {result['python']}, {result['platform']}; {result['build_s']:.0f} s)")
    click.echo(install_hint(result["path"]))
