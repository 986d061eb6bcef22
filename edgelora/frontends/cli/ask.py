"""`edgelora ask`: one prompt, one answer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from edgelora.conversation.chat import ctrl_c_cancels as _ctrl_c_cancels
from edgelora.frontends.cli.completion import complete_role
from edgelora.frontends.cli.doctor import _why_no_offload
from edgelora.frontends.cli.options import (_engine_options, _role_stack, _spec_name, _unique_name, parse_spec)


@click.command()
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
    from edgelora.config import load_config
    from edgelora.runtime.engine import Engine
    from edgelora.roles.session import AUTO, Roles

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

    from edgelora.conversation.chat import ChatSession, role_specs_from_label
    from edgelora.conversation.history import History, HistoryError

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
