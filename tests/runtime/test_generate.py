"""The token loop (runtime/generate.py): text is shown as soon as no stop string can start in it."""

from __future__ import annotations

import pytest

from edgelora.runtime.generate import partial_stop
from edgelora.runtime.llama import Context

from ..conftest import GREEDY

MSGS = [{"role": "user", "content": "Describe a lighthouse on a rocky coast at night."}]


@pytest.mark.parametrize("text, stop, held", [
    ("Hello <|im", ["<|im_end|>"], 4), ("Hello", ["<|im_end|>"], 0), ("a <", ["<|im_end|>", "<br>"], 1),
    ("ab", ["abc"], 2), ("abc", ["abc"], 0), ("x", [], 0), ("the en", ["end", "the end."], 6)])
def test_only_an_end_that_could_start_a_stop_string_is_held(text, stop, held):
    assert partial_stop(text, stop) == held


def test_the_first_token_is_shown_without_waiting_for_more(clean_engine, monkeypatch):
    """A chat's stop string (the template's end marker) is 10 characters: the first piece used to wait
    for 10 characters of answer, several decodes when the machine is loaded."""
    decodes, decode = [0], Context.decode

    def counting(context, batch):
        decodes[0] += 1
        return decode(context, batch)

    monkeypatch.setattr(Context, "decode", counting)
    stream = clean_engine.stream_chat(MSGS, max_tokens=16, **GREEDY)
    first = next(stream)
    assert first and decodes[0] == 1
    stream.close()


def test_a_stop_string_split_across_tokens_is_never_shown(clean_engine):
    whole = clean_engine.chat(MSGS, max_tokens=24, **GREEDY).text
    stop = whole[len(whole) // 2: len(whole) // 2 + 6]  # from mid-answer: likely spans a token boundary
    pieces = list(clean_engine.stream_chat(MSGS, max_tokens=24, stop=[stop], **GREEDY))
    assert "".join(pieces) == whole[:whole.index(stop)]
