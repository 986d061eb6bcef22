"""The edgelora chat app: chat with the local model, switch roles mid-conversation.

Generation runs in a thread worker; Esc stops it. Anything that changes what the engine does
(a role switch, a new prompt, quitting, compare) first stops a running reply and waits for it."""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header
from textual.worker import Worker

from edgelora.conversation.chat import SLASH_COMMANDS, ChatSession, parse_slash, role_specs_for
from edgelora.errors import EdgeloraError
from edgelora.frontends.tui.providers import RolesProvider
from edgelora.frontends.tui.screens import CompareScreen, HistoryScreen
from edgelora.frontends.tui.widgets import ChatMessage, PromptInput, RolesPanel, StatusBar, Transcript, help_notice, welcome


class EdgeloraApp(App):
    TITLE = "edgelora"
    CSS_PATH = "edgelora.tcss"
    COMMANDS = App.COMMANDS | {RolesProvider}
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "focus_roles", "Roles"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "history", "History"),
        # also while the input has focus; off the footer, which has no room for it at 80 columns (/help lists it)
        Binding("ctrl+y", "copy_last", "Copy reply", priority=True, show=False),
    ]
    INPUT_KEYS = [("enter", "send"), ("ctrl+j", "new line (shift+enter where the terminal tells it)"),
                  ("up/down", "earlier inputs"), ("ctrl+c", "copy the selection; stops an answer")]

    def notify(self, message: str, *, markup: bool = False, **kwargs) -> None:
        """Notices quote file names, role names and user text: never parsed as markup."""
        super().notify(message, markup=markup, **kwargs)

    def __init__(self, session: ChatSession, *, resume: int | None = None) -> None:
        super().__init__()
        self.session = session
        self._resume = resume
        self._worker: Worker | None = None
        self.last_speed: float | None = None

    @property
    def roles(self):
        return self.session.roles

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield Transcript(id="transcript")
                yield PromptInput(id="prompt")
            yield RolesPanel(id="roles")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = self.session.engine.model_path.name
        if self._resume is not None:
            await self.resume(self._resume)
        else:
            await self.show_welcome()
        self.refresh_state()
        self.query_one(PromptInput).focus()

    # ------------------------------------------------------------------ state shown

    def refresh_state(self, note: str = "") -> None:
        self.query_one(RolesPanel).refresh_roles(self.roles)
        self.query_one(StatusBar).show(self.roles, self.last_speed, note, used=self._context_used())

    def _context_used(self) -> int:
        """Tokens the current conversation fills, also right after a resume or a new chat."""
        if not self.session.messages:
            return 0
        try:
            return len(self.session.engine.render_chat(self.session.messages)[0])
        except EdgeloraError:
            return 0

    @property
    def generating(self) -> bool:
        return self._worker is not None and self._worker.is_running

    async def stop_generation(self) -> None:
        """Stop a reply in progress and wait until the engine is free."""
        if self._worker is not None:
            if self._worker.is_running:
                self.session.engine.cancel()
            await self._worker.wait()
            self._worker = None

    # ------------------------------------------------------------------ input

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if text.startswith("/"):
            await self.run_slash(text)
            return
        await self.stop_generation()
        await self.send(text)

    async def show_welcome(self) -> None:
        role = "auto" if self.roles.auto else self.roles.current.label
        await self.query_one(Transcript).mount(welcome(self.session.engine.model_path.name, role))

    async def show_help(self) -> None:
        keys = [*self.INPUT_KEYS, *((b.key, b.description.lower()) for b in self.BINDINGS), ("ctrl+p", "command palette")]
        transcript = self.query_one(Transcript)
        await transcript.mount(help_notice(SLASH_COMMANDS, keys))
        transcript.scroll_end(animate=False)

    async def send(self, text: str) -> None:
        transcript = self.query_one(Transcript)
        await transcript.query("#welcome").remove()
        self.session.add_user(text)
        await transcript.mount(ChatMessage("user", text))
        reply = self.session.start_reply()
        widget = ChatMessage("assistant", label=reply.label + " · …")
        await transcript.mount(widget)
        transcript.scroll_end(animate=False)
        self._worker = self._generate(reply, widget)

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, reply, widget: ChatMessage) -> None:
        try:
            for piece in self.session.stream_reply(reply, on_start=lambda r, route: self.call_from_thread(
                    self._started, r, route, widget)):
                self.call_from_thread(widget.append, piece)
        except EdgeloraError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error")
        self.call_from_thread(self._finished, reply, widget)

    def _started(self, reply, route, widget: ChatMessage) -> None:
        widget.set_label(reply.label + " · …")
        if route is not None:
            self.notify(f"auto → {route.role}: {route.reason}", timeout=6)

    async def _finished(self, reply, widget: ChatMessage) -> None:
        await widget.finish()
        out = reply.completion
        suffix = " · stopped" if out is not None and out.finish_reason == "cancelled" else ""
        widget.set_label(reply.label + suffix)
        self.last_speed = out.tokens_per_s if out is not None else None
        self.refresh_state()

    # ------------------------------------------------------------------ roles

    async def switch(self, specs: list[str]) -> None:
        await self.stop_generation()
        try:
            self.roles.use(specs)
        except EdgeloraError as exc:
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.refresh_state()
        # a toast wraps; the one-line status bar would cut a long stack ('now pirate:0.5 +')
        self.notify(f"now {self.roles.current.label if not self.roles.auto else 'auto'}", timeout=4)

    async def on_roles_panel_chosen(self, event: RolesPanel.Chosen) -> None:
        await self.switch([event.name])
        self.query_one(PromptInput).focus()

    async def run_slash(self, text: str) -> None:
        try:
            command, args = parse_slash(text)
            if command in ("role", "mix", "base", "auto"):
                await self.switch(role_specs_for(command, args))
            elif command == "scale":
                await self.switch(self._rescaled(args))
            elif command == "compare":
                if len(args) != 2:
                    raise EdgeloraError("/compare takes two roles: /compare a b")
                await self.action_compare(*args)
            elif command == "help":
                await self.show_help()
            elif command == "new":
                await self.action_new_chat()
            elif command == "history":
                await self.action_history()
            elif command == "rename":
                if self.session.conversation is None or self.session.history is None:
                    raise EdgeloraError("nothing to rename yet: send a message first")
                self.session.history.rename(self.session.conversation, " ".join(args))
                self.notify("Renamed")
            elif command == "export":
                if self.session.conversation is None or self.session.history is None or len(args) != 1:
                    raise EdgeloraError("/export FILE.md exports the current conversation")
                # the CLI's rule: only a new file or an earlier export is written, never the model
                out = self.session.history.write_export(self.session.conversation, Path(args[0]),
                                                        protected=self.base_protected(), flag="/export")
                self.notify(f"Exported to {out}")
            else:
                raise EdgeloraError(f"unknown command /{command}; /help lists the commands")
        except EdgeloraError as exc:
            self.notify(str(exc), severity="error", timeout=8)

    def base_protected(self) -> list[tuple[Path, str]]:
        """Files an export must never replace: the loaded base model."""
        return [(Path(self.session.engine.model_path), "the base model")]

    def _rescaled(self, args: list[str]) -> list[str]:
        if len(args) != 2:
            raise EdgeloraError("/scale NAME S, e.g. /scale pirate 0.5")
        name, value = args
        try:
            weight = float(value)
        except ValueError:
            raise EdgeloraError(f"/scale: {value!r} is not a number") from None
        current = list(self.roles.current.resolved.roles)
        if name not in [n for n, _ in current]:
            raise EdgeloraError(f"/scale: role '{name}' is not active (active: {self.roles.current.label})")
        return [f"{n}:{weight if n == name else w:g}" for n, w in current]

    # ------------------------------------------------------------------ actions

    async def action_stop(self) -> None:
        if self.generating:
            self.session.engine.cancel()

    def action_help_quit(self) -> None:
        """Ctrl+C (where no selection is copied): stops an answer, as in `edgelora ask`; says how to quit."""
        if self.generating:
            self.session.engine.cancel()
        self.notify("Press Ctrl+Q to quit", title="Do you want to quit?")

    def action_focus_roles(self) -> None:
        self.query_one(RolesPanel).focus()

    def action_copy_last(self) -> None:
        replies = list(self.query(ChatMessage).filter(".assistant"))
        if replies:
            self.copy_to_clipboard(replies[-1].text)
            self.notify("Reply copied")

    async def action_new_chat(self) -> None:
        await self.stop_generation()
        self.session.new()
        await self.query_one(Transcript).remove_children()
        await self.show_welcome()
        self.refresh_state("new conversation")

    async def resume(self, conversation_id: int) -> None:
        await self.stop_generation()
        self.session.resume(conversation_id)
        transcript = self.query_one(Transcript)
        await transcript.remove_children()
        for m in self.session.history.messages(conversation_id):
            await transcript.mount(ChatMessage(m.role, m.content, label=m.label))
        transcript.scroll_end(animate=False)
        self.refresh_state(f"resumed conversation {conversation_id}")

    async def action_history(self) -> None:
        if self.session.history is None:
            self.notify("history is off", severity="warning")
            return
        await self.stop_generation()

        async def chosen(conversation_id: int | None) -> None:
            if conversation_id is not None:
                await self.resume(conversation_id)

        self.push_screen(HistoryScreen(self.session.history, protected=self.base_protected()), chosen)

    async def action_compare(self, a: str, b: str) -> None:
        prompt = self.session.last_user_prompt()
        if prompt is None:
            self.notify("ask something first: /compare answers the last prompt", severity="warning")
            return
        await self.stop_generation()
        self.push_screen(CompareScreen(self.session, prompt, a, b))

    async def action_quit(self) -> None:
        await self.stop_generation()
        self.exit()


def run_app(session: ChatSession, resume: int | None = None) -> None:
    EdgeloraApp(session, resume=resume).run()
