"""The `edgelora` command: a thin layer over Engine. User errors print one line and exit 2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .chat import ctrl_c_cancels as _ctrl_c_cancels
from .completion import complete_model, complete_role
from .errors import EdgeloraError

EXIT_USER_ERROR = 2
COMPLETE_VAR = "_EDGELORA_COMPLETE"  # click's shell completion switch for prog_name "edgelora"


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


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgelora")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """edgelora: one local GGUF model, LoRA adapters switched while it runs.

    With no command it opens the chat app (the same as `edgelora chat`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(chat)


@cli.command()
@click.option("--role", "role_specs", multiple=True, metavar="NAME[:W]", shell_complete=complete_role,
              help="Role(s) to start with; 'auto' routes per prompt.")
@click.option("--resume", type=int, metavar="ID", help="Resume a saved conversation (see `edgelora history list`).")
@click.option("-c", "--continue", "cont", is_flag=True, help="Resume the latest conversation.")
@click.option("--preload", multiple=True, metavar="ROLE", shell_complete=complete_role, help="Load these roles' adapters at start.")
@click.option("--force", is_flag=True, help="Use roles made for another base (shape checks still run).")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Most tokens per answer [default: 256].")
@click.option("--plain", is_flag=True, help="A line-by-line chat instead of the app (automatic when stdin or stdout is not a terminal).")
@_engine_options
def chat(role_specs=(), resume=None, cont=False, preload=(), force=False, temperature=None, max_tokens=None,
         plain=False, model=None, n_gpu_layers=0, n_ctx=4096, n_threads=None, verbose=False):
    """Open the chat app: chat with the local model and switch roles mid-conversation.

    With --plain, or when stdin or stdout is not a terminal, a line chat: one prompt or /command per line."""
    from .chat import ChatSession
    from .config import load_config
    from .engine import Engine
    from .history import History
    from .session import Roles

    config = load_config()
    eng = Engine(model or config.default_model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads,
                 kv_cache_bytes=config.kv_cache_bytes, verbose=verbose)
    roles = Roles(eng, config, force=force)
    roles.preload(preload)
    roles.use(list(role_specs) or ["base"])
    history = History() if config.save_history else None
    if cont and history is not None:
        latest = history.latest()
        resume = latest.id if latest else None
    if resume is not None:
        if history is None:
            raise EdgeloraError("save_history = false in the config: there is no history to resume")
        history.get(resume)  # a clear error before the screen opens
    session = ChatSession(roles, history, temperature=temperature, max_tokens=max_tokens)
    if plain or not (_is_tty(sys.stdin) and _is_tty(sys.stdout)):
        from .linechat import run_line_chat

        if resume is not None:
            session.resume(resume)
        run_line_chat(session)
    else:
        from .tui.app import run_app

        run_app(session, resume=resume)
    eng.close()


def _is_tty(stream) -> bool:
    return stream is not None and stream.isatty()


@cli.command()
@click.argument("prompt", required=False)
@click.option("-s", "--system", help="System prompt (replaces the role's).")
@click.option("--role", "role_specs", multiple=True, metavar="NAME[:W]", shell_complete=complete_role,
              help="Role to answer as (repeatable, stacked with weights); 'auto' picks one per prompt; a .toml path loads that manifest.")
@click.option("--adapter", "adapters", multiple=True, metavar="PATH[:SCALE]", help="Attach a GGUF LoRA adapter (repeatable).")
@click.option("--preload", multiple=True, metavar="ROLE", shell_complete=complete_role,
              help="Load these roles' adapters at start (resident, not active).")
@click.option("--force", is_flag=True, help="Use roles made for another base (shape checks still run).")
@_engine_options
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1), default=None, help="Nucleus sampling: keep the likeliest tokens up to this total probability.")
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="Sample among the K likeliest tokens (0 = all).")
@click.option("--min-p", type=click.FloatRange(0, 1), default=None, help="Drop tokens less likely than this fraction of the likeliest.")
@click.option("--repeat-penalty", type=click.FloatRange(min=0), default=None, help="Penalty for repeating tokens (1 = none).")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Most tokens to generate [default: 256].")
@click.option("--no-stream", is_flag=True, help="Print the answer once it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, model, adapters, usage, timings.")
@click.option("-c", "--continue", "cont", is_flag=True, help="Continue the latest conversation (from the TUI or ask).")
@click.option("--no-log", is_flag=True, help="Do not save this exchange in the history.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print --role auto's choice and reason on stderr.")
def ask(prompt, system, role_specs, adapters, preload, force, model, n_gpu_layers, n_ctx, n_threads, verbose, as_json,
        no_stream, cont, no_log, quiet, **sampling):
    """Answer PROMPT once. Text piped on stdin goes before PROMPT."""
    from .config import load_config
    from .engine import Engine
    from .session import AUTO, Roles

    piped = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    text = "\n\n".join(p for p in (piped.strip(), prompt or "") if p)
    if not text:
        raise click.UsageError("no prompt: give PROMPT or pipe text on stdin")
    raw = [parse_spec(s, "--adapter") for s in adapters]
    paths = (_spec_name(s) for s in role_specs)
    manifests = [Path(p) for p in paths if p.endswith(".toml")]

    config = load_config()
    t0 = time.perf_counter()
    eng = Engine(model or config.default_model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads,
                 kv_cache_bytes=config.kv_cache_bytes, verbose=verbose)
    if n_gpu_layers and not eng.gpu_layers:
        click.echo(f"edgelora: note: --n-gpu-layers {n_gpu_layers}: nothing offloaded ({_why_no_offload()}); running on the CPU", err=True)
    roles = Roles(eng, config, extra=manifests, force=force)
    if verbose:
        for name, paths in roles.catalog.shadowed.items():
            click.echo(f"edgelora: note: role '{name}' from the manifest given by path shadows {', '.join(map(str, paths))}", err=True)
    specs = _role_stack(role_specs, "--role") or ["base"]
    names = [_spec_name(s) for s in specs]
    if AUTO in names and len(names) > 1:
        raise click.BadParameter("'auto' picks one role per prompt; it cannot be stacked", param_hint="--role")
    roles.preload(preload)
    roles.use(specs)  # 'auto' decides per prompt, inside the chat turn
    for path, scale in raw:
        eng.attach(path, name=_unique_name(eng, Path(path).stem), scale=scale, force=force)
    load_s = time.perf_counter() - t0

    from .chat import ChatSession, role_specs_from_label
    from .history import History, HistoryError

    no_log = no_log or not config.save_history
    history = None
    if cont or not no_log:
        try:
            history = History()
        except HistoryError as exc:  # keep answering; say what is not being saved
            click.echo(f"edgelora: note: {exc}; answering without history", err=True)
    session = ChatSession(roles, history if not no_log else None, **sampling)
    if cont and history is not None:
        latest = history.latest()
        if latest is not None:
            session.resume(latest.id)
            if not role_specs:  # continuing keeps the conversation's role unless --role says otherwise
                said = [m.label for m in history.messages(latest.id) if m.role == "assistant" and m.label]
                if said:
                    roles.use(role_specs_from_label(said[-1]))
            if no_log:
                session.history = None
    if system:
        session.messages.insert(0, {"role": "system", "content": system})
    try:
        session.add_user(text)  # saved before generating: a killed run keeps the prompt
    except HistoryError as exc:
        click.echo(f"edgelora: note: {exc}; answering without history", err=True)
        session.history = None
    reply = session.start_reply()
    interrupted = False
    with _ctrl_c_cancels(eng) as stop:
        try:
            for piece in session.stream_reply(reply, on_start=None if quiet else _say_route):
                if not (as_json or no_stream):
                    click.echo(piece, nl=False)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            interrupted = True  # the partial answer is saved, marked stopped; say so below
    interrupted = interrupted or stop.is_set()
    out = eng.last
    chosen = roles.current.route if roles.auto else None
    if as_json:
        click.echo(json.dumps({
            "text": out.text,
            "conversation": session.conversation,
            "model": str(eng.model_path),
            "role": roles.current.label,
            "route": {"role": chosen.role, "reason": chosen.reason} if chosen else None,
            "adapters": roles.adapter_report(),  # named after the roles chosen (two roles may share one file)
            "finish_reason": "cancelled" if interrupted else out.finish_reason,
            "device": eng.device,
            "offload": eng.offload.as_dict(),
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
    if interrupted:
        raise KeyboardInterrupt


def _say_route(reply, chosen) -> None:
    if chosen is not None:  # --role auto: one line on stderr, before the answer
        click.echo(f"edgelora: auto -> {chosen.role} ({chosen.reason})", err=True)


def _unique_name(eng, stem: str) -> str:
    name, i = stem, 2
    while name in eng.resident:
        name, i = f"{stem}-{i}", i + 1
    return name


def _spec_name(spec: str) -> str:
    """The role or manifest path of 'x:WEIGHT', by the one grammar roles use (-0.5 and 1e0 are weights too)."""
    from .roles import parse_spec as parse_role_spec

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
        from .roles import load_manifest

        return load_manifest(path).name + spec[len(path):]  # its ':WEIGHT' as given
    return spec


@cli.command()
@_model_option
@click.option("--n-gpu-layers", "n_gpu_layers", type=click.IntRange(min=-1), default=0, show_default=True,
              help="Also load the model with this many layers offloaded and report where llama.cpp put them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable field names).")
def doctor(model, n_gpu_layers, as_json):
    """Versions, llama.cpp backend build, GPU devices and offload, and the default model."""
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
        "devices": [d.as_dict() for d in b.devices],
        "system_info": b.system_info,
    }
    try:
        path = resolve_model(model)
        info = read_gguf(path)
        report["cpu"] = _cpu_report(path, info)
        report["model"] = {
            "path": str(path),
            "name": info.name,
            "architecture": info.architecture,
            "size_bytes": info.size,
            "sha256": sha256_file(path),
        }
        if n_gpu_layers:
            report["offload"] = _offload_report(path, n_gpu_layers)
    except EdgeloraError as exc:
        report["model"] = {"error": str(exc)}
    report["routing_model"] = _routing_model_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    width = max(map(len, report))
    for key, value in report.items():
        if key == "devices":
            value = [f"{d['name']} ({d['description']}, {d['type']}, {d['memory_total_mib']} MiB)" for d in value]
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "devices" and isinstance(v, list):  # offload.devices
                    v = ", ".join(f"{d['name']} ({d['description']})" for d in v) or "none"
                elif isinstance(v, dict):  # offload.model_buffers_mib
                    v = ", ".join(f"{name} {size} MiB" for name, size in v.items())
                click.echo(f"{(key + '.' + k):<{width + 16}}  {_doctor_text(key + '.' + k, v)}")
        else:
            click.echo(f"{key:<{width + 16}}  {', '.join(value) if isinstance(value, list) else value}")
    if "cpu" in report and not report["cpu"]["extra_buffers"]:
        click.echo(f"\nllama.cpp's extra CPU buffers (weight repacking, AMX) are off: {report['cpu']['reason']}.")
    if not report["routing_model"]["installed"]:
        click.echo(f"\n--role auto routes by word overlap only: {report['routing_model']['error']}.")
    if b.build == "CPU":
        click.echo("\nThis llama.cpp build runs on the CPU only; see README 'GPU offload' to build with CUDA, Metal or Vulkan.")
    elif not b.offload_devices:
        click.echo(f"\nThis llama.cpp build ({b.build}) sees no GPU device, so layers stay on the CPU"
                   + ("; a software Vulkan device (llvmpipe) is used only with GGML_VK_VISIBLE_DEVICES=0." if "Vulkan" in b.backends else "."))


# Text mode only: what an unset value means (--json keeps null and "").
DOCTOR_UNSET_TEXT = {"cpu.probe_s": "not run", "cpu.omp_wait_policy": "default (unset)",
                     "cpu.gomp_spincount": "default (unset)"}


def _doctor_text(key: str, value):
    return DOCTOR_UNSET_TEXT[key] if value in (None, "") and key in DOCTOR_UNSET_TEXT else value


def _routing_model_report() -> dict:
    """Whether the sentence-embedding model `--role auto` routes with is installed (nothing is loaded)."""
    from .embedder import DIST, EmbedderMissing, model_dir

    try:
        return {"installed": True, "package": DIST, "path": str(model_dir())}
    except EmbedderMissing as exc:
        return {"installed": False, "package": DIST, "error": str(exc)}


def _why_no_offload() -> str:
    from .backend import backend_info

    b = backend_info()
    if b.build == "CPU":  # no GPU backend registered (gpu_offload is also false for a GPU build with no device)
        return "this llama.cpp build is CPU-only; README 'GPU offload'"
    if "Vulkan" in b.backends and not b.offload_devices:
        return "no Vulkan GPU visible; a software device (llvmpipe) needs GGML_VK_VISIBLE_DEVICES=0"
    return f"llama.cpp's {b.build} build found no usable device"


def _offload_report(model_path, n_gpu_layers) -> dict:
    """Load the model with n_gpu_layers and report what llama.cpp did (devices, layers, buffers)."""
    from . import Engine

    eng = Engine(model_path, n_gpu_layers=n_gpu_layers, n_ctx=256)
    try:
        return {"requested": n_gpu_layers, **eng.offload.as_dict()}
    finally:
        eng.close()


def _cpu_report(model_path, info) -> dict:
    """Which CPU kernel path llama.cpp takes here and why (may run the one-time probe)."""
    import os

    from . import cpu

    path = cpu.decide(model_path, file_type=info.metadata.get("general.file_type"))
    return {**path.as_dict(), "features": cpu.cpu_features(), "amx": cpu.has_amx(),
            "threads": cpu.check_threads(None), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "")}


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor and its shape.")
@click.option("--metadata", "show_metadata", is_flag=True, help="Also list every metadata key.")
@click.option("--json", "as_json", is_flag=True, help="Print everything (metadata, tensors) as one JSON object.")
def inspect(file, show_tensors, show_metadata, as_json):
    """What a GGUF file is (model or adapter): type, architecture, rank, alpha, targets, size."""
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
    from .gguf_summary import summarize

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


@cli.command()
@click.argument("peft_dir", type=click.Path())
@click.option("--base", metavar="BASE.gguf", help="Base GGUF to convert against (default: the embedded default base).")
@click.option("-o", "--output", "out", metavar="OUT.gguf", help="Output file (default: <PEFT_DIR name>.gguf here).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True, help="Tensor type written.")
@click.option("--name", help="general.name of the adapter (default: the folder's name).")
@click.option("--dry-run", is_flag=True, help="Print the tensor plan and write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing -o file that is not a GGUF adapter.")
def convert(peft_dir, base, out, outtype, name, dry_run, force):
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
        write_plan(plan, target, progress=sys.stderr.isatty(), force=force)
    except ConvertError as exc:
        raise EdgeloraError(str(exc)) from None
    click.echo(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB, {len(plan.tensors)} LoRA pairs, alpha {plan.alpha:g})")


@cli.command()
@click.argument("role_specs", nargs=-1, required=True, metavar="ROLE...", shell_complete=complete_role)
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="Folder to write (created if missing).")
@click.option("--format", "fmt", type=click.Choice(["peft"]), default="peft", show_default=True, help="Output format.")
@click.option("--hf-base", metavar="PATH_OR_REPO", help="The base in Hugging Face form, for vLLM (default: the repository the GGUF names).")
@click.option("--role-dir", "role_dirs", multiple=True, type=click.Path(file_okay=False), help="Extra roles folder (repeatable).")
@click.option("--force", is_flag=True, help="Replace files and PEFT folders in --to that an earlier export did not write.")
@_model_option
def export(role_specs, to, fmt, hf_base, role_dirs, force, model):
    """Roles -> PEFT LoRA folders, roles.json and a vLLM launch script (ROLE: a name, a manifest path, or a stack a:0.7+b:0.3)."""
    from .config import load_config
    from .export import export_roles, split_stack
    from .models import resolve_model
    from .roles import RoleCatalog
    from .session import default_folders

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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_model_option
@click.option("--tokens", type=click.IntRange(min=8), default=128, show_default=True, help="Tokens generated per throughput run.")
@click.option("--repeat", type=click.IntRange(min=1), default=None, help="Repetitions, the median is reported [default: 5; 1 with --quick].")
@click.option("--quick", is_flag=True, help="One repetition and 32 tokens (about 1 minute for the core section instead of ~5).")
@click.option("--only", "sections", multiple=True, type=click.Choice(["core", "cpu", "server", "gpu"]),
              help="Run only these sections (repeatable; default: all). cpu: threads, OpenMP wait policy, load, "
                   "extra buffers, probe; server: HTTP throughput one role vs mixed, returning-client TTFT; "
                   "gpu: every layer on the GPU device vs the CPU (logits, speed), skipped without a device.")
def bench(as_json, model, tokens, repeat, sections, quick):
    """Measure switching, attach, generation speed and time to first token (progress on stderr)."""
    from .bench import print_table, run_bench

    repeat = repeat or (1 if quick else 5)
    tokens = 32 if quick and tokens == 128 else tokens
    t0 = time.perf_counter()
    result = run_bench(model=model, n_tokens=tokens, repeat=repeat, sections=sections or None,
                       progress=lambda msg: click.echo(f"[{time.perf_counter() - t0:6.1f} s] {msg}", err=True))
    click.echo(json.dumps(result, indent=2) if as_json else print_table(result))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; not loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--role-dir", "role_dirs", multiple=True, type=click.Path(file_okay=False), help="Extra roles folder (repeatable).")
@click.option("--preload", multiple=True, metavar="ROLE", help="Load these roles' adapters at start.")
@click.option("--api-key", envvar="EDGELORA_API_KEY", help="Require 'Authorization: Bearer KEY' (env EDGELORA_API_KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN", help="Allow browser pages from this origin (repeatable).")
@click.option("--max-queue", type=click.IntRange(1, 1024), default=16, show_default=True, help="Requests waiting before 503.")
@click.option("--force", is_flag=True, help="Use roles made for another base (shape checks still run).")
@click.option("--no-prefix-reuse", is_flag=True, help="Evaluate every prompt from scratch: greedy answers repeat exactly (README 'Reproducibility').")
@click.option("--fallback-role", metavar="ROLE", help="Answer requests naming an unknown model (e.g. gpt-4o-mini) with this role "
              "instead of 404 (config key fallback_role).")
@click.option("--quiet", is_flag=True, help="No per-request log line on stderr.")
@_engine_options
def serve(host, port, role_dirs, preload, api_key, cors_origins, max_queue, force, no_prefix_reuse, fallback_role, quiet,
          model, n_gpu_layers, n_ctx, n_threads, verbose):
    """OpenAI-compatible HTTP server: the request's `model` names the role (base, auto, pirate, a:0.7+b:0.3)."""
    import uvicorn

    from .config import load_config
    from .engine import Engine
    from .server import Service, build_app, is_loopback, loopback_hosts
    from .server_extras import check_cors_origins, check_fallback_role
    from .session import Roles
    from .server_http import max_connections_for, uvicorn_settings

    if not is_loopback(host) and not api_key:
        raise click.BadParameter(f"binding {host} (not loopback) needs --api-key", param_hint="--host")
    if (problem := check_cors_origins(cors_origins, api_key)) is not None:
        raise click.BadParameter(problem, param_hint="--cors-origin")
    config = load_config()
    config.roles_dirs = [*config.roles_dirs, *role_dirs]
    eng = Engine(model or config.default_model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads,
                 kv_cache_bytes=config.kv_cache_bytes, verbose=verbose, reuse_prefix=not no_prefix_reuse)
    roles = Roles(eng, config, force=force)
    roles.preload(preload)
    fallback_role = fallback_role or config.fallback_role
    try:
        check_fallback_role(roles.catalog, fallback_role)
    except EdgeloraError as exc:
        raise click.BadParameter(str(exc), param_hint="--fallback-role / config fallback_role") from None
    service = Service(eng, roles, max_queue=max_queue, fallback_role=fallback_role)
    app = build_app(service, api_key=api_key, allowed_hosts=loopback_hosts(host) if is_loopback(host) else None,
                    cors_origins=list(cors_origins) or None, request_log=not quiet)
    names = ", ".join(["base", "auto", *roles.catalog.names()])
    click.echo(f"edgelora serve: http://{host}:{port}/v1  model {eng.model_path.name}  roles: {names}", err=True)
    click.echo(f"web page: http://{host}:{port}/" + (f"  unknown models answered by: {fallback_role}" if fallback_role else ""),
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning",
                **uvicorn_settings(max_connections=max_connections_for(max_queue)))
    eng.close()


@cli.command()
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
    from .offline.build import build_bundle, install_hint

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


# ---------------------------------------------------------------------------- roles


def _catalog(extra=()):
    from .config import load_config
    from .roles import RoleCatalog
    from .session import default_folders

    config = load_config()
    return config, RoleCatalog(default_folders(config), manifests=list(extra))


@cli.group()
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
    from .gguf_info import read_gguf, validate_adapter
    from .models import resolve_model
    from .registry import verify_adapter_file
    from .roles import adapter_role, load_manifest
    from .session import user_roles_dir
    from .storage import install_role

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
    from .train.cli import run_train

    run_train(name=name, data=data, n_eval=n_eval, rank=rank, alpha=alpha, targets=targets, epochs=epochs, lr=lr,
              batch=batch, max_length=max_length, seed=seed, description=description, dry_run=dry_run, force=force,
              model=model)


@roles.command("remove")
@click.argument("name", shell_complete=complete_role)
def roles_remove(name):
    """Remove a role you added (bundled roles cannot be removed)."""
    from .session import user_roles_dir
    from .storage import remove_role

    _, catalog = _catalog()
    role = catalog.get(name)
    if role.path is None or role.path.parent != user_roles_dir().resolve():
        raise EdgeloraError(f"role '{name}' is not in your roles folder ({user_roles_dir()}); it comes from {role.path}")
    remove_role(role)
    click.echo(f"removed role '{name}'")


# ---------------------------------------------------------------------------- adapters


@cli.group()
def adapters():
    """Verify, sign and pull adapters."""


@adapters.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list: role, file, status.")
def adapters_verify(as_json):
    """Check every known adapter against its manifest's sha256 (and signature)."""
    from .registry import verify_catalog

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
    from .signing import keygen

    click.echo(keygen(Path(private_key)))


@adapters.command("sign")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "private_key", required=True, type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
def adapters_sign(file, private_key):
    """Write FILE.sig, an ed25519 signature of FILE."""
    from .signing import sign

    click.echo(f"wrote {sign(Path(file), Path(private_key))}")


@adapters.command("pull")
@click.argument("repo")
@click.option("--name", help="Role name for it (default: the repository's name).")
@click.option("--revision", help="Branch, tag or commit.")
@click.option("-m", "--model", help="Base to convert against (default: the configured or embedded default).")
def adapters_pull(repo, name, revision, model):
    """Fetch a PEFT or GGUF LoRA from the Hugging Face Hub and make it a role."""
    from .hub import pull_adapter

    config, catalog = _catalog()
    role_path = pull_adapter(repo, name=name, revision=revision, model=model or config.default_model, catalog=catalog)
    click.echo(f"added role from {repo}: {role_path}")


@cli.group()
def models():
    """Base models: pull NAME (catalog) or ORG/REPO [FILE] (Hub), list what is here, rm."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def models_list(as_json):
    """The catalog and pulled models: the name -m takes, whether it is installed, size, path."""
    from .models import local_models

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
    from .models import link_pulled, pull_catalog_model

    if "/" in name:
        from .hub import pull_model

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
    from .models import removal_plan, remove_model

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


@cli.group()
def config():
    """The config file."""


@config.command("show")
def config_show():
    """The values in force, as valid TOML (redirect it into the config file if you like)."""
    from .config import cache_dir, config_text, data_dir, load_config
    from .session import default_folders

    cfg = load_config()
    click.echo(f"# {cfg.path} ({'exists' if cfg.path and cfg.path.exists() else 'not created; defaults'})")
    click.echo(f"# data folder: {data_dir()}\n# cache folder: {cache_dir()}")
    click.echo("# roles folders: " + ", ".join(map(str, default_folders(cfg))))
    click.echo(config_text(cfg), nl=False)


@config.command("path")
def config_path_cmd():
    """Print where the config file is (EDGELORA_CONFIG overrides)."""
    from .config import config_path

    click.echo(config_path())


@config.command("init")
@click.option("--force", is_flag=True, help="Replace an existing config file.")
def config_init(force):
    """Write a commented default config file (refuses to overwrite without --force)."""
    from .config import config_path, init_config

    click.echo(f"wrote {init_config(config_path(), force=force)}")


@config.command("edit")
def config_edit():
    """Open the config file in $VISUAL or $EDITOR (written with the defaults first if missing), then check it."""
    from .config import config_path, edit_config

    edit_config(config_path())
    click.echo(f"{config_path()}: valid")


# ---------------------------------------------------------------------------- history


@cli.group()
def history():
    """Saved conversations (SQLite in the user data folder)."""


@history.command("list")
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True, help="Most conversations to list.")
def history_list(limit):
    """Conversations, latest first: id, last change, messages, the role of the last answer, title."""
    from datetime import datetime

    from .history import History

    found = History().list(limit)
    roles = [c.label.split(" · ", 1)[0] or "-" for c in found]
    width = max(map(len, roles), default=0)
    for c, role in zip(found, roles):
        when = datetime.fromtimestamp(c.updated).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{c.id:>5}  {when}  {c.n_messages:>3} msgs  {role:<{width}}  {c.title}")


@history.command("show")
@click.argument("conversation", type=int)
def history_show(conversation):
    """Print one conversation as Markdown, each answer labelled with its role."""
    from .history import History

    click.echo(History().export_markdown(conversation))


@history.command("export")
@click.argument("conversation", type=int)
@click.option("-o", "--output", type=click.Path(), help="Write to a file instead of stdout.")
@click.option("--force", is_flag=True, help="Replace an existing -o file that is not an earlier export.")
def history_export(conversation, output, force):
    """Export a conversation as Markdown."""
    from .history import History

    if output:
        History().write_export(conversation, Path(output), force=force, protected=_base_protected())
    else:
        click.echo(History().export_markdown(conversation))


def _base_protected() -> list[tuple[Path, str]]:
    """The configured base model, never to be overwritten by an export (when it can be found)."""
    from .config import load_config
    from .models import resolve_model

    try:
        return [(resolve_model(load_config().default_model), "the base model")]
    except EdgeloraError:
        return []


@history.command("rm")
@click.argument("conversations", type=int, nargs=-1, required=True, metavar="ID...")
@click.option("-y", "--yes", is_flag=True, help="Delete without asking.")
def history_rm(conversations, yes):
    """Delete conversations (asks first unless --yes). Also `history delete`."""
    from .history import History

    store = History()
    doomed = [store.get(i) for i in dict.fromkeys(conversations)]  # an unknown id: one-line error, nothing deleted
    if not yes:
        titles = "; ".join(f"{c.id} '{c.title or 'untitled'}'" for c in doomed)
        try:
            sure = click.confirm(f"Delete {titles}?", default=False, err=True)
        except click.exceptions.Abort:  # end of input: the answer is no
            sure = False
        if not sure:
            click.echo("nothing deleted", err=True)
            return
    for c in doomed:
        store.delete(c.id)
        click.echo(f"deleted conversation {c.id}")


history.add_command(history_rm, "delete")


@history.command("search")
@click.argument("query")
def history_search(query):
    """Full-text search (SQLite FTS5 syntax)."""
    from .history import History

    for m, snippet in History().search(query):
        click.echo(f"{m.conversation_id:>5}  {m.role:<9}  {snippet}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: click without its standalone mode, so every user error is one line and exit 2."""
    from . import crashnote

    args = sys.argv[1:] if argv is None else argv
    if COMPLETE_VAR not in os.environ:  # a Tab press (shell completion) prints nothing but its words
        crashnote.report_previous_crashes(lambda line: click.echo(line, err=True))
        crashnote.start(" ".join(a for a in args[:1] if not a.startswith("-")) or "chat")
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
    except UnicodeError as exc:  # invalid UTF-8 on stdin, or lone surrogates from undecodable argv bytes
        click.echo(f"edgelora: error: the input (prompt, stdin or a flag's value) is not valid UTF-8 "
                   f"({exc.reason} at position {exc.start})", err=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        click.echo("edgelora: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
