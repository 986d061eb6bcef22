"""One turn, the only way an answer is made: select → route ('auto') → admit and apply the adapters →
render → generate (streamed) → save.

`ask` and the TUI reach it through ChatSession.stream_reply (which saves the answer to the history);
the server's Service calls it for chat and completion requests. None of them touches Roles'
internals or merges sampling by hand: the steps are Roles' public methods."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edgelora.roles.manifest import Resolved
from edgelora.roles.selection import Selection
from edgelora.roles.session import Active, Roles, last_user_text
from edgelora.runtime.engine import Completion
from edgelora.runtime.generate import Stream


@dataclass
class Turn:
    roles: Roles
    messages: list[dict] | None = None  # a chat turn: the conversation so far, the prompt last
    prompt: str | None = None  # a raw completion (no template, no system prompt)
    selection: Selection | str | Resolved | None = None  # None: the roles' current selection
    sampling: dict = field(default_factory=dict)  # over the role's defaults; None values are not given
    # known once the turn runs:
    auto: bool = False  # the role was routed for this prompt
    active: Active | None = None  # the role that answers
    completion: Completion | None = None  # None when generation never started
    stopped: bool = False  # cancelled, interrupted, or the stream closed early
    _pieces: Stream | None = field(default=None, init=False, repr=False)

    def start(self, on_start: Callable[[Turn], None] | None = None) -> None:
        """Decide and apply the role and queue the request, evaluating nothing yet (the server starts
        every request that arrived together this way, so their prompts share one decode).
        ``on_start(turn)`` once the role is decided and applied."""
        roles, engine = self.roles, self.roles.engine
        if isinstance(self.selection, Resolved):
            roles.apply(self.selection)
        elif self.selection is not None:
            roles.select(self.selection)
        self.auto = roles.auto
        self.active = roles.prepare(self.prompt if self.messages is None else last_user_text(self.messages))
        sampling = roles.sampling_for(self.sampling)
        if self.messages is not None:
            self._pieces = engine.stream_chat(roles.messages_for(self.messages), **sampling).start()
        else:
            self._pieces = engine.stream_complete(self.prompt or "", **sampling).start()
        if on_start is not None:
            on_start(self)

    def stream(self, on_start: Callable[[Turn], None] | None = None,
               save: Callable[[Turn], None] | None = None) -> Iterator[str]:
        """The answer's pieces (starting the turn first if ``start`` was not called). ``save(turn)``
        at the end, also when stopped (then ``turn.stopped``)."""
        if self._pieces is None:
            self.start(on_start)
        pieces = self._pieces
        try:
            yield from pieces
        except BaseException:
            self.stopped = True
            raise
        finally:
            pieces.close()
            self.completion = pieces.completion
            if self.completion is not None and self.completion.finish_reason == "cancelled":
                self.stopped = True
            if save is not None:
                save(self)

    def close(self) -> None:
        """Stop a started turn that will not be read (its sequence is released)."""
        if self._pieces is not None:
            self._pieces.close()
