"""A conversation over Roles, saved to History as it goes. UI-free: the TUI drives it.

The role that answers is captured when the reply starts, so a reply is never labelled with a role
it was not generated with."""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from edgelora.runtime.engine import Completion
from edgelora.errors import EdgeloraError
from edgelora.conversation.history import History
from edgelora.roles.manifest import BASE_ROLE
from edgelora.roles.session import Roles


def label_for(role: str, out: Completion | None = None, adapters: list[dict] | None = None) -> str:
    if adapters is None:  # the caller's names win: the engine names a shared file after its first role
        adapters = out.adapters if out is not None else []
    names = ", ".join(f"{a['name']}×{a['scale']:g}" for a in adapters) or "no adapter"
    speed = f" · {out.tokens_per_s:.0f} tok/s" if out is not None and out.tokens_per_s else ""
    return f"{role} · {names}{speed}"


AUTO_PREFIX = "auto → "  # a label's role part when 'auto' chose it: `-c` then continues in auto
STOPPED = " · stopped"


def is_stopped(label: str | None) -> bool:
    """Whether a saved answer was stopped before its end (its label says so)."""
    return bool(label) and label.endswith(STOPPED)


def role_specs_from_label(label: str) -> list[str]:
    """The role specs a saved answer's label names ('pirate + terse:0.3 · …' -> ['pirate', 'terse:0.3'])."""
    role = label.split(" · ", 1)[0].strip()
    if role.startswith(AUTO_PREFIX):
        return ["auto"]
    return [part.strip() for part in role.split(" + ") if part.strip()] or [BASE_ROLE]


@dataclass
class Reply:
    role: str  # the role label at the start of the reply
    adapters: list[dict]
    completion: Completion | None = None
    stopped: bool = False

    @property
    def label(self) -> str:
        return label_for(self.role, self.completion, self.adapters)


class ChatSession:
    def __init__(self, roles: Roles, history: History | None = None, **sampling):
        self.roles = roles
        self.history = history
        self.sampling = sampling
        self.messages: list[dict] = []
        self.conversation: int | None = None

    @property
    def engine(self):
        return self.roles.engine

    def new(self) -> None:
        self.messages, self.conversation = [], None
        self.engine.new_conversation()

    def resume(self, conversation_id: int) -> None:
        if self.history is None:
            raise EdgeloraError("no history store")
        self.messages = [m.as_chat() for m in self.history.messages(conversation_id) if not is_stopped(m.label)]
        self.conversation = conversation_id
        self.engine.new_conversation()

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        if self.history is not None:
            if self.conversation is None:
                self.conversation = self.history.new()
            self.history.add(self.conversation, "user", text)

    def start_reply(self) -> Reply:
        if self.roles.auto:  # decided per prompt, once the reply starts: do not show the last role meanwhile
            return Reply(AUTO_PREFIX + "…", [])
        return Reply(self.roles.current.label, self.roles.adapter_report())

    def stream_reply(self, reply: Reply, messages: list[dict] | None = None, on_start=None) -> Iterator[str]:
        """Pieces of the answer to the conversation. The answer is saved at the end, also when it was
        stopped (cancel, Ctrl+C, a closed stream): then its label says so."""
        before = self.engine.last
        auto = self.roles.auto
        stream = self.roles.stream_chat(messages if messages is not None else self.messages, **self.sampling)
        reply.role = (AUTO_PREFIX if auto else "") + self.roles.current.label  # 'auto' decides inside stream_chat
        reply.adapters = self.roles.adapter_report()
        if on_start is not None:  # the role is decided (routed), the prompt not yet evaluated
            on_start(reply, self.roles.current.route if auto else None)
        try:
            yield from stream
        except BaseException:
            reply.stopped = True
            raise
        finally:
            out = self.engine.last if self.engine.last is not before else None
            reply.completion = out
            if out is not None and out.finish_reason == "cancelled":
                reply.stopped = True
            if messages is None and out is not None and out.text:
                if not reply.stopped:  # a stopped half answer is kept (saved, shown) but is no context:
                    self.messages.append({"role": "assistant", "content": out.text})  # later answers imitate it
                if self.history is not None and self.conversation is not None:
                    self.history.add(self.conversation, "assistant", out.text,
                                     label=reply.label + (STOPPED if reply.stopped else ""))

    def last_user_prompt(self) -> list[dict] | None:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i]["role"] == "user":
                return self.messages[: i + 1]
        return None


SLASH_COMMANDS = [  # (usage, what it does): /help shows them, an unknown command names them
    ("/role NAME", "answer as this role from the next reply on"),
    ("/mix a:0.5 b:0.5", "stack roles with weights"),
    ("/scale NAME S", "change one active role's weight"),
    ("/base", "the base model, no adapter"),
    ("/auto", "pick a role for each prompt"),
    ("/compare A B", "answer the last prompt with two roles side by side"),
    ("/new", "start a new conversation"),
    ("/history", "browse, search and resume conversations"),
    ("/rename TITLE", "rename this conversation"),
    ("/export FILE.md", "save this conversation as Markdown"),
    ("/help", "this list"),
]
SLASH_HELP = " · ".join(usage for usage, _ in SLASH_COMMANDS)


def parse_slash(text: str) -> tuple[str, list[str]]:
    """'/mix a:0.5 b:0.5' -> ('mix', ['a:0.5', 'b:0.5'])."""
    try:
        parts = shlex.split(text[1:])
    except ValueError as exc:
        raise EdgeloraError(f"{text}: {exc}") from None
    if not parts:
        raise EdgeloraError(f"empty command; try {SLASH_HELP}")
    return parts[0].lower(), parts[1:]


def role_specs_for(command: str, args: list[str]) -> list[str]:
    if command == "base":
        return [BASE_ROLE]
    if command == "auto":
        return ["auto"]
    if not args:
        raise EdgeloraError(f"/{command} needs a role name")
    if command == "role" and len(args) != 1:
        raise EdgeloraError("/role takes one role name; use /mix to stack roles")
    return args


@contextlib.contextmanager
def ctrl_c_cancels(engine):
    """For `ask` and the line chat: the first Ctrl+C stops the answer (prefill included) and keeps it;
    a second one quits at once. Yields the event set by that first Ctrl+C."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        engine.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
