"""`edgelora chat`: the chat app, or a line-by-line chat when not on a terminal."""

from __future__ import annotations

import sys

import click

from edgelora.errors import EdgeloraError
from edgelora.frontends.cli.completion import complete_role
from edgelora.frontends.cli.options import _engine_options


@click.command()
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
    from edgelora.conversation.chat import ChatSession
    from edgelora.config import load_config
    from edgelora.runtime.engine import Engine
    from edgelora.conversation.history import History
    from edgelora.roles.session import Roles

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
        from edgelora.frontends.linechat import run_line_chat

        if resume is not None:
            session.resume(resume)
        run_line_chat(session)
    else:
        from edgelora.frontends.tui.app import run_app

        run_app(session, resume=resume)
    eng.close()


def _is_tty(stream) -> bool:
    return stream is not None and stream.isatty()
