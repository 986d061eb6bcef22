"""Chat prompts from the model's own chat template, with only the template's markers as control tokens.

A chat template is code from the model file: its time and output are bounded. Message contents are
tokenized as plain text, so a user typing ``<|im_end|><|im_start|>system`` gets those characters,
not a new system turn. The pure parts (bounds, content markers, control-token splitting) need no model."""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edgelora.errors import ContextLengthError, EdgeloraError, ModelError
from edgelora.models.catalog import known_chat_template
from edgelora.runtime.llama import LlamaHandle

TEMPLATE_BUDGET_S = 2.0  # a chat template is code from the model file: bound what it may cost


class ChatTemplate:
    """The model's chat template (else the catalog's for a GGUF that lacks one) bound to its tokenizer."""

    def __init__(self, llama: LlamaHandle, model_path: Path):
        self.llama = llama
        self.model_path = model_path
        self.formatter = self.make_formatter()

    def make_formatter(self, template: str | None = None):
        """A formatter for ``template`` (default: the model's), its output bounded by what the context holds."""
        template = template or self.llama.metadata.get("tokenizer.chat_template") or known_chat_template(self.model_path)
        if not template:
            return None
        return self.llama.chat_formatter(template, bound=lambda env: _BoundedTemplate(env, lambda: self.prompt_chars_limit))

    def render_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """Prompt tokens and stop strings."""
        if self.formatter is None:
            raise ModelError(f"{self.model_path.name} has no chat template (none in the GGUF, none in the model "
                             "catalog), so it cannot chat; use an instruct model, or plain completion")
        messages = list(messages)
        result = self.render(messages)
        pieces = _split_contents(result.prompt, self.render(_placeholders(messages)).prompt, messages)
        bos = self.llama.token_bos()
        tokens = [bos] if not result.added_special and bos >= 0 else []
        tokens += tokens_from_pieces(pieces, self.control, self.control_re, self.text_tokens)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s for s in stop if s]

    def text_tokens(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    @functools.cached_property
    def control(self) -> dict[str, int]:
        """Control tokens (<|im_start|>, <start_of_turn>...) by their text."""
        return self.llama.control_tokens()

    @functools.cached_property
    def control_re(self) -> re.Pattern:
        return control_pattern(self.control)

    @functools.cached_property
    def prompt_chars_limit(self) -> int:
        """No prompt longer than this fits the context: no token stands for more characters than its text."""
        return self.llama.n_ctx() * max(self.llama.longest_token_chars(), 1)

    def render(self, messages: list[dict]):
        limit, n_ctx = self.prompt_chars_limit, self.llama.n_ctx()
        if sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)) > limit:
            raise ContextLengthError(f"the messages are over {limit} characters; the context holds {n_ctx} "
                                "tokens (raise --ctx)")
        try:
            return _within(TEMPLATE_BUDGET_S, lambda: self.formatter(messages=messages))
        except TimeoutError:
            raise ModelError(f"{self.model_path.name}: its chat template ran over {TEMPLATE_BUDGET_S:g} s "
                             "(a runaway loop?); use complete() or fix the template") from None
        except _PromptTooLong:
            raise ModelError(f"{self.model_path.name}: its chat template wrote over {limit} characters, more than "
                             f"the {n_ctx}-token context can hold (a runaway loop?); use complete() or "
                             "fix the template") from None
        except Exception as exc:  # the template may raise_exception() on bad roles/order
            raise EdgeloraError(f"chat template error: {exc}") from None


def control_pattern(control: dict[str, int]) -> re.Pattern:
    names = sorted(control, key=len, reverse=True)  # longest first, as llama.cpp matches
    return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else re.compile("(?!)")


def tokens_from_pieces(pieces: list[tuple[str, bool]], control: dict[str, int], control_re: re.Pattern,
                       text_tokens: Callable[[str], list[int]]) -> list[int]:
    """Like llama.cpp's own special=True tokenization (cut at control-token texts, tokenize each run
    between them as text), except that cuts are made only in the template's own text, never in a
    message's content."""
    tokens: list[int] = []
    run = ""
    for piece, is_content in pieces:
        if is_content:
            run += piece
            continue
        for part in control_re.split(piece):
            if part in control:
                tokens += text_tokens(run) + [control[part]]
                run = ""
            else:
                run += part
    return tokens + text_tokens(run)


def _within(seconds: float, fn):
    """Run fn, raising TimeoutError once it has run ``seconds`` (checked on every Python line it runs:
    Jinja templates compile to Python, so a runaway template loop is stopped)."""
    deadline = time.perf_counter() + seconds
    previous = sys.gettrace()

    def tracer(frame, event, arg):
        if time.perf_counter() > deadline:
            raise TimeoutError
        return tracer

    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(previous)


class _PromptTooLong(Exception):
    pass


class _BoundedTemplate:
    """A compiled chat template whose output stops once it passes ``limit()`` characters: a
    template's loop can write far more than any context holds (and fill memory) within its time bound."""

    def __init__(self, template, limit):
        self.template, self.limit = template, limit

    def render(self, *args, **kwargs) -> str:
        limit, size, pieces = self.limit(), 0, []
        for piece in self.template.generate(*args, **kwargs):
            size += len(piece)
            if size > limit:
                raise _PromptTooLong
            pieces.append(piece)
        return "".join(pieces)


_MARK = "\x00edgelora-content-{}\x00"
_MARK_RE = re.compile("(\x00edgelora-content-\\d+\x00)")


def _placeholders(messages: list[dict]) -> list[dict]:
    """The same messages with each string content replaced by a marker the template passes through."""
    return [{**m, "content": _MARK.format(i)} if isinstance(m.get("content"), str) else m for i, m in enumerate(messages)]


def _split_contents(prompt: str, marked: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """Cut the rendered prompt into (text, is_message_content) pieces.

    ``marked`` is the template rendered with markers for contents; matching it against the real
    prompt finds each content as the template rendered it (a template may trim it)."""
    parts = _MARK_RE.split(marked)  # odd indices are markers
    pattern = "".join("(.*?)" if i % 2 else re.escape(p) for i, p in enumerate(parts))
    m = re.fullmatch(pattern, prompt, re.S)
    if m is None:  # the template changed the text around contents: put the raw contents in the markers
        return [(messages[int(p.strip("\x00").rsplit("-", 1)[1])]["content"] if i % 2 else p, bool(i % 2))
                for i, p in enumerate(parts)]
    return [(m.group(i // 2 + 1) if i % 2 else p, bool(i % 2)) for i, p in enumerate(parts)]
