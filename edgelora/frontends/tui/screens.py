"""Screens: side-by-side comparison of two roles, and the conversation history."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, OptionList
from textual.widgets.option_list import Option

from edgelora.errors import EdgeloraError
from edgelora.conversation.history import is_history_export
from edgelora.frontends.tui.widgets import ChatMessage


class CompareScreen(ModalScreen):
    """The last prompt answered by two roles side by side; the active role is restored after."""

    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, session, prompt: list[dict], a: str, b: str) -> None:
        super().__init__()
        self.session, self.prompt, self.pair = session, prompt, (a, b)

    def compose(self) -> ComposeResult:
        question = self.prompt[-1]["content"]
        with Vertical(id="compare"):
            yield Label(escape(f"Compare: {question}"), id="compare-title")
            with Horizontal():
                for i, name in enumerate(self.pair):
                    with VerticalScroll(classes="compare-column"):
                        yield ChatMessage("assistant", label=f"{name} · …").set_class(True, f"side-{i}")
            yield Footer()

    def on_mount(self) -> None:
        self._worker = self._run()

    @work(thread=True, exclusive=True, group="compare")
    def _run(self) -> None:
        roles = self.session.roles
        previous = list(roles.specs)
        try:
            for i, name in enumerate(self.pair):
                widget = self.query_one(f".side-{i}", ChatMessage)
                try:
                    roles.use([name])
                except EdgeloraError as exc:
                    self.app.call_from_thread(widget.set_label, f"{name} · {exc}")  # set_label escapes
                    continue
                reply = self.session.start_reply()
                for piece in self.session.stream_reply(reply, messages=self.prompt):
                    self.app.call_from_thread(widget.append, piece)
                self.app.call_from_thread(widget.finish)
                self.app.call_from_thread(widget.set_label, reply.label)
        finally:
            roles.use(previous)

    async def action_close(self) -> None:
        if self._worker.is_running:
            self.session.engine.cancel()
        await self._worker.wait()
        self.app.refresh_state()
        self.dismiss()


def export_name(cid: int) -> Path:
    """conversation-N.md in the current folder, or the first conversation-N-2.md, -3, ... that is free
    or an earlier export: Ctrl+E never replaces someone's own file."""
    path, i = Path(f"conversation-{cid}.md"), 2
    while os.path.lexists(path) and not (path.is_file() and not path.is_symlink() and is_history_export(path)):
        path, i = Path(f"conversation-{cid}-{i}.md"), i + 1
    return path


class HistoryScreen(ModalScreen[int | None]):
    """Saved conversations: type to search (full text), Up/Down pick, Enter resumes, Ctrl+D deletes
    (press twice), Ctrl+E exports. The search field has the focus, so typing always searches."""

    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("down", "move(1)", "Next", show=False),
        Binding("up", "move(-1)", "Previous", show=False),
        Binding("ctrl+d", "delete", "Delete", priority=True),  # over the search field's own Ctrl+D
        Binding("ctrl+e", "export", "Export .md", priority=True),
    ]

    def __init__(self, history, *, protected: list[tuple[Path, str]] = ()) -> None:
        super().__init__()
        self.history = history
        self.protected = protected  # files an export must never replace (the base model)
        self._armed: tuple[int, float] | None = None  # (conversation, when) of a first delete press

    def compose(self) -> ComposeResult:
        with Vertical(id="history"):
            yield Input(placeholder="search conversations…", id="history-search")
            yield OptionList(id="history-list")
            yield Footer()

    def on_mount(self) -> None:
        self.fill()
        self.query_one(Input).focus()

    def fill(self, query: str = "") -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        if query:
            try:
                hits = self.history.search(query)
            except EdgeloraError:
                hits = []
            seen = []
            for m, snippet in hits:
                if m.conversation_id not in seen:
                    seen.append(m.conversation_id)
                    options.add_option(Option(Text(f"#{m.conversation_id:<5} {snippet}"), id=str(m.conversation_id)))
        else:
            for c in self.history.list(200):
                when = datetime.fromtimestamp(c.updated).strftime("%Y-%m-%d %H:%M")
                options.add_option(Option(Text(f"#{c.id:<5} {when}  {c.n_messages:>3} msgs  {c.title}"), id=str(c.id)))
        if options.option_count:
            options.highlighted = 0  # Enter, Ctrl+D and Ctrl+E act on a row at once

    def on_input_changed(self, event: Input.Changed) -> None:
        self.fill(event.value.strip())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        cid = self._selected()
        if cid is not None:
            self.dismiss(cid)

    def action_move(self, step: int) -> None:
        options = self.query_one(OptionList)
        if options.option_count:
            current = options.highlighted or 0
            options.highlighted = max(0, min(options.option_count - 1, current + step))

    def _selected(self) -> int | None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return None
        return int(options.get_option_at_index(options.highlighted).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def action_delete(self) -> None:
        cid = self._selected()
        if cid is None:
            return
        now = time.monotonic()
        if self._armed is None or self._armed[0] != cid or now - self._armed[1] > 5:
            self._armed = (cid, now)
            self.notify(f"Press Ctrl+D again to delete conversation #{cid}", severity="warning", markup=False)
            return
        self._armed = None
        self.history.delete(cid)
        self.fill(self.query_one(Input).value.strip())
        self.notify(f"Deleted conversation #{cid}", markup=False)

    def action_export(self) -> None:
        cid = self._selected()
        if cid is None:
            return
        try:
            path = self.history.write_export(cid, export_name(cid), protected=self.protected, flag="")
        except EdgeloraError as exc:
            self.notify(str(exc), severity="error", timeout=8, markup=False)
            return
        self.notify(f"Exported to {path.resolve()}", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)
