"""The `edgelora` command: a thin layer over the engine and roles API. User errors print one line and exit 2."""

from __future__ import annotations

import os
import sys

import click

from edgelora.convert.errors import ConvertError
from edgelora.errors import EdgeloraError
from edgelora.frontends.cli.options import EXIT_USER_ERROR
from edgelora.frontends.cli.chat import chat
from edgelora.frontends.cli.ask import ask
from edgelora.frontends.cli.doctor import doctor
from edgelora.frontends.cli.files import inspect, convert, export, bundle
from edgelora.frontends.cli.bench import bench
from edgelora.frontends.cli.serve import serve
from edgelora.frontends.cli.roles import roles
from edgelora.frontends.cli.adapters import adapters
from edgelora.frontends.cli.models import models
from edgelora.frontends.cli.config import config
from edgelora.frontends.cli.history import history

COMPLETE_VAR = "_EDGELORA_COMPLETE"  # click's shell completion switch for prog_name "edgelora"

@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgelora")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """edgelora: one local GGUF model, LoRA adapters switched while it runs.

    With no command it opens the chat app (the same as `edgelora chat`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(chat)

for _command in (chat, ask, doctor, inspect, convert, export, bundle, bench, serve, roles, adapters, models, config, history):
    cli.add_command(_command)

def main(argv: list[str] | None = None) -> int:
    """Entry point: click without its standalone mode, so every user error is one line and exit 2."""
    from edgelora.safety import crashnote

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
    except (EdgeloraError, ConvertError) as exc:  # the converter's errors are user errors too
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
