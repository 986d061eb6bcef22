"""`edgelora history ...`."""

from __future__ import annotations

from pathlib import Path

import click

from edgelora.errors import EdgeloraError


@click.group()
def history():
    """Saved conversations (SQLite in the user data folder)."""


@history.command("list")
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True, help="Most conversations to list.")
def history_list(limit):
    """Conversations, latest first: id, last change, messages, the role of the last answer, title."""
    from datetime import datetime

    from edgelora.conversation.history import History

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
    from edgelora.conversation.history import History

    click.echo(History().export_markdown(conversation))


@history.command("export")
@click.argument("conversation", type=int)
@click.option("-o", "--output", type=click.Path(), help="Write to a file instead of stdout.")
@click.option("--force", is_flag=True, help="Replace an existing -o file that is not an earlier export.")
def history_export(conversation, output, force):
    """Export a conversation as Markdown."""
    from edgelora.conversation.history import History

    if output:
        History().write_export(conversation, Path(output), force=force, protected=_base_protected())
    else:
        click.echo(History().export_markdown(conversation))


def _base_protected() -> list[tuple[Path, str]]:
    """The configured base model, never to be overwritten by an export (when it can be found)."""
    from edgelora.config import load_config
    from edgelora.models.catalog import resolve_model

    try:
        return [(resolve_model(load_config().default_model), "the base model")]
    except EdgeloraError:
        return []


@history.command("rm")
@click.argument("conversations", type=int, nargs=-1, required=True, metavar="ID...")
@click.option("-y", "--yes", is_flag=True, help="Delete without asking.")
def history_rm(conversations, yes):
    """Delete conversations (asks first unless --yes). Also `history delete`."""
    from edgelora.conversation.history import History

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


@history.command("search")
@click.argument("query")
def history_search(query):
    """Full-text search (SQLite FTS5 syntax)."""
    from edgelora.conversation.history import History

    for m, snippet in History().search(query):
        click.echo(f"{m.conversation_id:>5}  {m.role:<9}  {snippet}")
