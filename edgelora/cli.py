"""The `edgelora` command: a thin layer over Engine. User errors print one line and exit 2."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .errors import EdgeloraError

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
    return click.option("-m", "--model", metavar="MODEL", help="GGUF path or catalog name (default: embedded SmolLM2).")(f)


def _engine_options(f):
    f = click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's own log.")(f)
    f = click.option("--ctx", "n_ctx", type=click.IntRange(min=64), default=2048, show_default=True, help="Context size in tokens.")(f)
    f = click.option(
        "--n-gpu-layers", "n_gpu_layers", type=click.IntRange(min=-1), default=0, show_default=True,
        help="Layers to offload to the GPU (-1 = all, 0 = pure CPU).",
    )(f)
    return _model_option(f)


@click.group(invoke_without_command=True)
@click.version_option(package_name="edgelora")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """edgelora: one local GGUF model, LoRA adapters switched while it runs."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command()
@click.argument("prompt", required=False)
@click.option("-s", "--system", help="System prompt.")
@click.option("--adapter", "adapters", multiple=True, metavar="PATH[:SCALE]", help="Attach a GGUF LoRA adapter (repeatable).")
@_engine_options
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1), default=None)
@click.option("--top-k", type=click.IntRange(min=0), default=None)
@click.option("--min-p", type=click.FloatRange(0, 1), default=None)
@click.option("--repeat-penalty", type=click.FloatRange(min=0), default=None)
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Most tokens to generate [default: 256].")
@click.option("--no-stream", is_flag=True, help="Print the answer once it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, model, adapters, usage, timings.")
def ask(prompt, system, adapters, model, n_gpu_layers, n_ctx, verbose, as_json, no_stream, **sampling):
    """Answer PROMPT once. Text piped on stdin goes before PROMPT."""
    from .engine import Engine

    piped = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    text = "\n\n".join(p for p in (piped.strip(), prompt or "") if p)
    if not text:
        raise click.UsageError("no prompt: give PROMPT or pipe text on stdin")
    specs = [parse_spec(s, "--adapter") for s in adapters]

    t0 = time.perf_counter()
    eng = Engine(model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, verbose=verbose)
    for path, scale in specs:
        eng.attach(path, name=_unique_name(eng, Path(path).stem), scale=scale)
    load_s = time.perf_counter() - t0

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    stream = eng.stream_chat(messages, **sampling)
    if as_json or no_stream:
        for _ in stream:
            pass
    else:
        for piece in stream:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    out = eng.last
    if as_json:
        click.echo(json.dumps({
            "text": out.text,
            "model": str(eng.model_path),
            "adapters": out.adapters,
            "finish_reason": out.finish_reason,
            "device": eng.device,
            "usage": out.usage,
            "timings": {
                "load_s": round(load_s, 4),
                "ttft_s": round(out.ttft_s, 4),
                "total_s": round(out.total_s, 4),
                "tokens_per_s": round(out.tokens_per_s, 2),
            },
        }))
    elif no_stream:
        click.echo(out.text)
    else:
        click.echo()
    eng.close()


def _unique_name(eng, stem: str) -> str:
    name, i = stem, 2
    while name in eng.resident:
        name, i = f"{stem}-{i}", i + 1
    return name


@cli.command()
@_model_option
@click.option("--json", "as_json", is_flag=True)
def doctor(model, as_json):
    """Versions, llama.cpp backend build, GPU offload support, and the default model."""
    import importlib.metadata
    import platform

    from .backend import backend_info
    from .gguf_info import read_gguf, sha256_file
    from .models import resolve_model

    b = backend_info()
    report = {
        "edgelora": importlib.metadata.version("edgelora"),
        "python": platform.python_version(),
        "llama_cpp_python": b.llama_cpp_python,
        "gguf": importlib.metadata.version("gguf"),
        "backend": b.build,
        "ggml_backends": list(b.backends),
        "gpu_offload": b.gpu_offload,
        "system_info": b.system_info,
    }
    try:
        path = resolve_model(model)
        info = read_gguf(path)
        report["model"] = {
            "path": str(path),
            "name": info.name,
            "architecture": info.architecture,
            "size_bytes": info.size,
            "sha256": sha256_file(path),
        }
    except EdgeloraError as exc:
        report["model"] = {"error": str(exc)}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    width = max(map(len, report))
    for key, value in report.items():
        if isinstance(value, dict):
            for k, v in value.items():
                click.echo(f"{('model.' + k):<{width + 6}}  {v}")
        else:
            click.echo(f"{key:<{width + 6}}  {', '.join(value) if isinstance(value, list) else value}")
    if not b.gpu_offload:
        click.echo("\nThis llama.cpp build runs on the CPU only; see README 'GPU offload' to build with CUDA, Metal or Vulkan.")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(file, as_json):
    """Metadata and tensors of a GGUF file (model or adapter)."""
    from .gguf_info import read_gguf

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
    click.echo(f"{info.path}  ({info.size / 1e6:.2f} MB, {len(info.tensors)} tensors)")
    for k, v in report["metadata"].items():
        click.echo(f"  {k} = {v}")
    if "adapter" in report:
        for k, v in report["adapter"].items():
            click.echo(f"  [adapter] {k} = {v}")
    click.echo("tensors:")
    for k, v in report["tensors"].items():
        click.echo(f"  {k:<40} {v}")


@cli.command()
@click.argument("peft_dir", type=click.Path())
@click.option("--base", metavar="BASE.gguf", help="Base GGUF to convert against (default: the embedded default base).")
@click.option("-o", "--output", "out", metavar="OUT.gguf", help="Output file (default: <PEFT_DIR name>.gguf here).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True)
@click.option("--name", help="general.name of the adapter (default: the folder's name).")
@click.option("--dry-run", is_flag=True, help="Print the tensor plan and write nothing.")
def convert(peft_dir, base, out, outtype, name, dry_run):
    """Convert a Hugging Face PEFT LoRA folder into a GGUF LoRA adapter (no torch)."""
    from .convert import ConvertError, plan_conversion, write_plan
    from .models import resolve_model

    base_path = resolve_model(base)
    try:
        plan = plan_conversion(peft_dir, base_path, outtype=outtype, name=name)
        if dry_run:
            click.echo(plan.describe())
            return
        target = Path(out) if out else Path(f"{Path(peft_dir).resolve().name}.gguf")
        write_plan(plan, target, progress=sys.stderr.isatty())
    except ConvertError as exc:
        raise EdgeloraError(str(exc)) from None
    click.echo(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB, {len(plan.tensors)} LoRA pairs, alpha {plan.alpha:g})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_model_option
@click.option("--tokens", type=click.IntRange(min=8), default=128, show_default=True, help="Tokens generated per throughput run.")
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True, help="Repetitions (the median is reported).")
def bench(as_json, model, tokens, repeat):
    """Measure switching, attach, generation speed and time to first token."""
    from .bench import print_table, run_bench

    result = run_bench(model=model, n_tokens=tokens, repeat=repeat, progress=None if as_json else click.echo)
    click.echo(json.dumps(result, indent=2) if as_json else print_table(result))


def main(argv: list[str] | None = None) -> int:
    """Entry point: click without its standalone mode, so every user error is one line and exit 2."""
    try:
        rv = cli.main(args=argv, prog_name="edgelora", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("edgelora: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"edgelora: error: {exc.format_message()}", err=True)
        return EXIT_USER_ERROR if exc.exit_code == 2 or exc.exit_code == 1 else exc.exit_code
    except EdgeloraError as exc:
        click.echo(f"edgelora: error: {exc}", err=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        click.echo("edgelora: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
