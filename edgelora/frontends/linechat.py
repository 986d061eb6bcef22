"""`edgelora chat --plain`: the chat in a plain line loop, for shells, pipes and terminals without the app.

Each line is a prompt or a slash command; answers stream to stdout, everything else (role changes,
help, errors) goes to stderr, so `printf 'hi\\n/role pirate\\nhello\\n' | edgelora chat --plain > out.txt`
keeps only the answers. Turns go through chat.ChatSession, as in the app and `ask`: the prompt is
saved before the answer starts and the answer, or its stopped part, is saved with its role."""

from __future__ import annotations

import sys
from typing import TextIO

from edgelora.conversation.chat import ChatSession, ctrl_c_cancels, parse_slash, role_specs_for
from edgelora.errors import EdgeloraError

PROMPT = ">>> "
HELP = """\
/role NAME         answer as this role (/base: no adapter, /auto: pick one per prompt)
/mix a:0.7 b:0.3   stack roles with weights
/new               start a new conversation
/help              this list
/quit              leave (or Ctrl+D)
Ctrl+C stops an answer (it is kept, marked stopped); at the prompt it quits."""


class LineChat:
    def __init__(self, session: ChatSession, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None):
        self.session = session
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        # At a terminal: a prompt, readline editing and errors that do not end the chat. Piped: no prompt,
        # and a bad command ends the run (exit 2) rather than answering later lines with the wrong role.
        self.interactive = self.stdin.isatty()

    def note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def read_line(self) -> str | None:
        """The next line without its newline; None at end of input (Ctrl+D)."""
        if self.interactive and self.stdin is sys.stdin and self.stdout.isatty():
            try:
                import readline  # noqa: F401  (line editing and Up/Down for input())
            except ImportError:
                pass
            try:
                return input(PROMPT)  # readline draws the prompt on the terminal, so it can redraw it
            except EOFError:
                print(file=self.stderr)
                return None
        if self.interactive:  # stdout is redirected (`chat > log.txt`): the prompt is not an answer
            self.stderr.write(PROMPT)
            self.stderr.flush()
        line = self.stdin.readline()
        if not line and self.interactive:
            print(file=self.stderr)  # Ctrl+D: end the prompt's line
        return line.rstrip("\r\n") if line else None

    def run(self) -> None:
        if self.interactive:
            self.note(f"{self.role_text()} · /help for commands, /quit or Ctrl+D to leave")
        while (line := self.read_line()) is not None:
            text = line.strip()
            if not text:
                continue
            try:
                if not text.startswith("/"):
                    self.answer(line)
                elif not self.command(text):
                    return
            except EdgeloraError as exc:
                if not self.interactive:
                    raise
                self.note(f"edgelora: error: {exc}")

    def command(self, text: str) -> bool:
        """Run a slash command; False means quit."""
        name, args = parse_slash(text)
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.note(HELP)
        elif name == "new":
            self.session.new()
            self.note("new conversation")
        elif name in ("role", "mix", "base", "auto"):
            self.session.roles.use(role_specs_for(name, args))  # on an error the previous role stays
            self.note(f"now {self.role_text()}")
        else:
            raise EdgeloraError(f"unknown command /{name}; try /help")
        return True

    def role_text(self) -> str:
        return "auto" if self.session.roles.auto else self.session.roles.current.label

    def answer(self, text: str) -> None:
        from edgelora.conversation.history import HistoryError

        session = self.session
        try:
            session.add_user(text)
        except HistoryError as exc:  # keep chatting; say what is not being saved
            self.note(f"edgelora: note: {exc}; chatting without history")
            session.history = None
        reply = session.start_reply()
        with ctrl_c_cancels(session.engine) as stop:  # the same Ctrl+C rule as `ask`
            try:
                for piece in session.stream_reply(reply, on_start=self._routed):
                    self.stdout.write(piece)
                    self.stdout.flush()
            except KeyboardInterrupt:
                stop.set()
        self.stdout.write("\n")
        self.stdout.flush()
        if stop.is_set() or reply.stopped:
            self.note("[stopped]")

    def _routed(self, reply, route) -> None:
        if route is not None:
            self.note(f"auto → {route.role}: {route.reason}")


def run_line_chat(session: ChatSession, **streams) -> None:
    LineChat(session, **streams).run()
