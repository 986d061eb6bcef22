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
from edgelora.frontends.cli.options import _engine_options, _unique_name, role_selection
from edgelora.roles.selection import parse_adapter_spec
from edgelora.runtime.sampling import click_options as _sampling_options


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
@_sampling_options()  # --temperature --top-p --top-k --min-p --repeat-penalty --seed --max-tokens: the one table
@click.option("--no-stream", is_flag=True, help="Print the answer once it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, model, adapters, usage, timings.")
@click.option("-c", "--continue", "cont", is_flag=True, help="Continue the latest conversation (from the TUI or ask).")
@click.option("--no-log", is_flag=True, help="Do not save this exchange in the history.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print --role auto's choice and reason on stderr.")
def ask(prompt, system, role_specs, adapters, preload, force, model, n_gpu_layers, n_ctx, n_threads, verbose, as_json,
        no_stream, cont, no_log, quiet, **sampling):
    """Answer PROMPT once. Text piped on stdin goes before PROMPT."""
    from edgelora.config import load_config
    from edgelora.frontends.runtime import open_runtime

    piped = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    text = "\n\n".join(p for p in (piped.strip(), prompt or "") if p)
    if not text:
        raise click.UsageError("no prompt: give PROMPT or pipe text on stdin")
    raw = [parse_adapter_spec(s) for s in adapters]  # --adapter PATH[:SCALE]: a file, not a role
    selection = role_selection(role_specs, "--role")  # the repeated flags stack: one selection
    manifests = [Path(p) for p in selection.manifests]

    config = load_config()
    t0 = time.perf_counter()
    roles = open_runtime(config, model=model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads,
                         verbose=verbose, manifests=manifests, preload=preload, force=force)
    eng = roles.engine
    if n_gpu_layers and not eng.gpu_layers:
        click.echo(f"edgelora: note: --n-gpu-layers {n_gpu_layers}: nothing offloaded ({_why_no_offload()}); running on the CPU", err=True)
    if verbose:
        for name, paths in roles.catalog.shadowed.items():
            click.echo(f"edgelora: note: role '{name}' from the manifest given by path shadows {', '.join(map(str, paths))}", err=True)
    roles.select(selection)  # 'auto' decides per prompt, inside the turn
    for path, scale in raw:
        eng.attach(path, name=_unique_name(eng, Path(path).stem), scale=scale, force=force)
    load_s = time.perf_counter() - t0

    from edgelora.conversation.chat import ChatSession
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
            saved = session.saved_selection(latest.id)
            if not role_specs and saved is not None:  # continuing keeps the conversation's role unless --role says otherwise
                roles.select(saved)
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
            "threads": eng.threads.report(),  # the thread policy and the counts it chose (thread_policy.py)
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
