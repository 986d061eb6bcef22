"""Widgets of the chat app: messages, transcript, prompt input, roles panel, status bar."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message as TextualMessage
from textual.widgets import Label, Markdown, OptionList, Static, TextArea
from textual.widgets.option_list import Option


class ChatMessage(Vertical):
    """One message: a label line (who, role, adapters, speed) and its Markdown body."""

    DEFAULT_CLASSES = "message"

    def __init__(self, role: str, text: str = "", label: str = "") -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self._label = label
        self._stream = None

    def compose(self):
        who = {"user": "You", "assistant": "Assistant"}.get(self.role, self.role)
        yield Label(escape(f"{who}  {self._label}".rstrip()), classes="message-label")  # user text is never markup
        # a user's line breaks are kept (Markdown would join the lines of a paragraph)
        yield Markdown(self.text.replace("\n", "  \n") if self.role == "user" else self.text, classes="message-body")

    def set_label(self, label: str) -> None:
        self._label = label
        who = {"user": "You", "assistant": "Assistant"}.get(self.role, self.role)
        self.query_one(".message-label", Label).update(escape(f"{who}  {label}"))

    @property
    def label(self) -> str:
        return self._label

    async def append(self, piece: str) -> None:
        """Stream a piece of the answer (Textual's MarkdownStream batches fast updates)."""
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        self.text += piece
        await self._stream.write(piece)

    async def finish(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None


class Notice(Static):
    """A note in the transcript that is not part of the conversation (welcome, /help): never saved."""

    DEFAULT_CLASSES = "notice"


def welcome(model: str, role: str) -> Notice:
    text = Text.assemble(
        ("Welcome to edgelora", "bold"), f" — a local model ({model}) with switchable roles. Now answering as ",
        (role, "bold"), ".\n\nType a message and press Enter. Pick a role with Ctrl+R (or /role NAME), "
        "open the command palette with Ctrl+P, and type /help for every command and key.")
    return Notice(text, id="welcome")


def help_notice(commands: list[tuple[str, str]], keys: list[tuple[str, str]]) -> Notice:
    """The slash commands and the keys, as two small tables."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row(Text("Commands", style="underline"), "")
    for usage, what in commands:
        table.add_row(usage, what)
    table.add_row("", "")
    table.add_row(Text("Keys", style="underline"), "")
    for key, what in keys:
        table.add_row(key, what)
    return Notice(table, classes="help")


class Transcript(VerticalScroll):
    """The conversation. It follows the stream unless the user scrolls up (Textual's anchor)."""

    BINDINGS = [Binding("c", "copy", "Copy message", show=False)]

    def on_mount(self) -> None:
        self.anchor()

    def action_copy(self) -> None:
        messages = [m for m in self.query(ChatMessage) if m.has_focus_within] or list(self.query(ChatMessage))[-1:]
        if messages:
            self.app.copy_to_clipboard(messages[-1].text)
            self.app.notify("Message copied")


class PromptInput(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Shift+Enter where the terminal reports it) adds a
    newline, Up/Down on the first/last line walk through earlier inputs."""

    # Shown in the footer; the keys are handled in _on_key, in order with the typed characters
    # (a priority binding runs at app level and can overtake characters still queued here).
    BINDINGS = [
        Binding("enter", "send", "Send"),
        Binding("ctrl+j", "newline", "Newline", show=False),
    ]

    class Submitted(TextualMessage):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    PLACEHOLDER = "Ask something… (Enter sends, /help lists commands)"

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, placeholder=self.PLACEHOLDER, **kwargs)
        self.past: list[str] = []
        self._cursor: int | None = None

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_send()
        elif event.key in ("ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.action_newline()
        else:
            await super()._on_key(event)

    def action_send(self) -> None:
        text = self.text.strip()
        if not text:
            return
        self.past.append(text)
        self._cursor = None
        self.clear()
        self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")

    def _recall(self, step: int) -> bool:
        if not self.past:
            return False
        i = len(self.past) if self._cursor is None else self._cursor
        i = max(0, min(len(self.past), i + step))
        self._cursor = i
        self.load_text(self.past[i] if i < len(self.past) else "")
        self.move_cursor(self.document.end)
        return True

    def action_cursor_up(self, select: bool = False) -> None:
        if self.cursor_location[0] == 0 and not select and self._recall(-1):
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if self.cursor_location[0] == self.document.line_count - 1 and not select and self._cursor is not None:
            self._recall(+1)
            return
        super().action_cursor_down(select)


class RolesPanel(OptionList):
    """Every role and its state: ● active (with scale), ◦ resident, · on disk, and its description
    (cut to one line; the palette, Ctrl+P, shows it whole). Enter or click switches."""

    DESCRIPTION_WIDTH = 19  # the panel's inner width (edgelora.tcss: #roles: 24 less border, padding, gutter)
    AUTO_DESCRIPTION = "picks a role for each prompt"

    def on_mount(self) -> None:
        self.border_title = "Roles"
        self.border_subtitle = "ctrl+r"

    class Chosen(TextualMessage):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    def refresh_roles(self, roles) -> None:
        active = {name.split(":")[0]: weight for name, weight in roles.current.resolved.roles}
        highlighted = self.highlighted
        self.clear_options()
        names = ["base", *roles.catalog.names(), "auto"]
        for name in names:
            if roles.auto and name == "auto" or (not roles.auto and name in active):
                weight = active.get(name, 1.0)
                mark = f"● {name} ×{weight:g}" if name != "auto" else "● auto"
            elif name not in ("base", "auto") and _resident(roles, name):
                mark = f"◦ {name}"
            else:
                mark = f"· {name}"
            self.add_option(Option(Text.assemble(mark, "\n", (_one_line(role_description(roles, name),
                                                                           self.DESCRIPTION_WIDTH), "dim")), id=name))
        if highlighted is not None and highlighted < len(names):
            self.highlighted = highlighted

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Chosen(event.option.id))


def role_description(roles, name: str) -> str:
    if name == "auto":
        return RolesPanel.AUTO_DESCRIPTION
    try:
        return roles.catalog.get(name).description
    except Exception:  # a role defined twice: using it reports why
        return ""


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _resident(roles, name: str) -> bool:
    try:
        resolved = roles.catalog.resolve([name])
    except Exception:  # a broken role shows as on disk; using it reports why
        return False
    return bool(resolved.adapters) and all(roles.registry.is_resident(a) for a, _, _ in resolved.adapters)


class StatusBar(Static):
    """Model, device, active adapters, context used, speed, memory held by resident adapters.
    When the line is too wide the model name goes first (the header shows it too)."""

    _parts: list[str] = []

    def render(self) -> Text:
        width = self.content_size.width or 78
        parts = list(self._parts)
        if len(" · ".join(parts)) > width and len(parts) > 1:
            parts = parts[1:]
        line = " · ".join(parts)
        return Text(line if len(line) <= width else line[: width - 1] + "…")

    def show(self, roles, tokens_per_s: float | None = None, note: str = "", used: int | None = None) -> None:
        """``used``: tokens the conversation fills (default: what the KV cache holds now)."""
        eng = roles.engine
        adapters = ", ".join(f"{a['name']}×{a['scale']:g}" for a in roles.adapter_report()) or "no adapter"
        if roles.auto:
            adapters = f"auto ({adapters})"
        resident = sum(a.size for a in eng.resident.values()) / 1e6
        size = eng.llama.n_ctx() if eng.llama else 0
        if used is None:
            used = eng.llama.n_tokens if eng.llama else 0
        speed = f"{tokens_per_s:.0f} tok/s" if tokens_per_s else "– tok/s"
        model = eng.model_path.stem if len(eng.model_path.stem) <= 18 else eng.model_path.stem[:17] + "…"
        self._parts = [model, eng.device, adapters, f"ctx {used}/{size}", speed, f"{resident:.1f} MB resident",
                       *([note] if note else [])]
        self.refresh()
