"""The token loop: one generation's tokens (a scheduler sequence's) read as text.

Exact token counts, stop strings (text that might start one is held back), incremental UTF-8
decoding, the finish reason ('stop', 'length', 'cancelled') and timings. Anything that must happen
between two generated tokens goes in ``TokenLoop.run``, the one place the loop lives."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edgelora.runtime.llama import LlamaHandle
from edgelora.runtime.scheduler import Seq


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapters: list[dict] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (same adapter set), not re-evaluated

    @property
    def tokens_per_s(self) -> float:
        gen_s = self.total_s - self.ttft_s
        # The first token's time is prefill; the rate counts the tokens after it.
        if self.completion_tokens > 1 and gen_s > 0:
            return (self.completion_tokens - 1) / gen_s
        return 0.0

    @property
    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }


STARTED = object()  # what a generation yields first: its request is queued


class Stream:
    """One generation's text pieces: iterate it (or ``close()`` it to stop); ``completion`` once it
    ended (None before). Several may be open at once: each is its own scheduler sequence."""

    def __init__(self, pieces: Callable[[Stream], Iterator[str]]):
        self.completion: Completion | None = None
        self._pieces = pieces(self)  # yields STARTED once the request is queued, then the text
        self._started = False

    def start(self) -> Stream:
        """Queue the request now, without evaluating anything: whoever starts several (the server, at
        one round) gets their prompts evaluated together in the scheduler's next step."""
        if not self._started:
            self._started = True
            next(self._pieces)
        return self

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        self.start()
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


def find_stop(text: str, stop: list[str]) -> int | None:
    """Where the first stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def partial_stop(text: str, stop: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (held back
    until the next token tells; llama-server's find_partial_stop_string)."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TokenLoop:
    """One generation read as text: what it produced so far, and why it ended."""

    def __init__(self, llama: LlamaHandle, stop: list[str], max_tokens: int, seq: Seq):
        self.llama, self.stop, self.max_tokens, self.seq = llama, stop, max_tokens, seq
        self.text, self.n_out, self.finish = "", 0, "length"
        self.ttft = 0.0
        self.t0 = time.perf_counter()

    def run(self, tokens: Iterator[int]) -> Iterator[str]:
        """Yield text as it becomes safe to show (no stop string can start in it any more): only an
        end that could start one waits, so the first token's text is shown at once."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        emitted = 0
        for token in tokens:
            if self.n_out == 0 and not self.ttft:
                self.ttft = time.perf_counter() - self.t0
            if self.llama.is_eog(token):
                self.finish = "stop"
                break
            self.n_out += 1
            self.text += decoder.decode(self.llama.detokenize([token]))
            cut = find_stop(self.text, self.stop)
            if cut is not None:
                self.text, self.finish = self.text[:cut], "stop"
                break
            safe = len(self.text) - partial_stop(self.text, self.stop)
            if safe > emitted:
                yield self.text[emitted:safe]
                emitted = safe
            if self.n_out >= self.max_tokens:
                break
            if self.seq.cancelled:
                self.finish = "cancelled"
                break
        else:
            if self.seq.cancelled:  # stopped before its first token, or inside a decode
                self.finish = "cancelled"
        if len(self.text) > emitted:
            yield self.text[emitted:]
    def completion(self, prompt_tokens: int, adapters: list[dict], cached: int) -> Completion:
        return Completion(text=self.text, finish_reason=self.finish, prompt_tokens=prompt_tokens,
                          completion_tokens=self.n_out, adapters=adapters, ttft_s=self.ttft,
                          total_s=time.perf_counter() - self.t0, cached_tokens=cached)
