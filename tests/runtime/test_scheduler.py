"""Several sequences in one context (runtime/scheduler.py): each answer computed only under its own
adapter set, KV never reused across sets, cancellation frees a slot at once, a refused request
disturbs nobody. Real engine, real model, real adapters.

"Equal" (README 'Reproducibility'): llama.cpp's CPU kernels round differently for different batch
shapes, so an answer decoded beside others may differ from the same request alone where two tokens
are within rounding of each other. Sequences alone in their adapter group decode in the same batch
shape as alone and must match exactly; the others must match, or leave the solo answer only at a
near-tie (logit gap below ``NEAR_TIE`` under their own adapters, evaluated alone)."""

import numpy as np
import pytest

from edgelora import Engine
from edgelora.errors import ContextLengthError
from edgelora.runtime.llama import Context

from ..conftest import GREEDY

NEAR_TIE = 0.05  # logits; a wrong adapter set moves them by whole units
PROMPTS = ["What is the moon?", "Name three fruits.", "Why is the sea salty?", "Describe a forest."]


@pytest.fixture(scope="module")
def eng(smol_path, smol_adapters):
    with Engine(smol_path, n_ctx=512, parallel=4, n_threads=2) as e:
        e.load(smol_adapters["a"], name="a")
        e.load(smol_adapters["b"], name="b")
        yield e


def _msgs(prompt):
    return [{"role": "user", "content": prompt}]


def _solo(eng, adapters: dict, prompt: str, max_tokens: int) -> str:
    eng.set_adapters(adapters)
    eng.reuse_prefix = False
    try:
        return eng.chat(_msgs(prompt), max_tokens=max_tokens, **GREEDY).text
    finally:
        eng.reuse_prefix = True


def _together(eng, jobs: list[tuple[dict, str]], max_tokens: int) -> list:
    """Start every job (its adapters active when it starts), then read them a piece at a time in turn."""
    streams = []
    eng.reuse_prefix = False
    try:
        for adapters, prompt in jobs:
            eng.set_adapters(adapters)
            stream = eng.stream_chat(_msgs(prompt), max_tokens=max_tokens, **GREEDY)
            streams.append([stream, next(stream, "")])
        live = list(streams)
        while live:
            for item in list(live):
                piece = next(item[0], None)
                if piece is None:
                    live.remove(item)
                else:
                    item[1] += piece
    finally:
        eng.reuse_prefix = True
    return [(text, stream.completion) for stream, text in streams]


def _within_rounding(eng, adapters: dict, prompt: str, got: str, alone: str) -> bool:
    """``got`` equals ``alone``, or leaves it where ``alone``'s token was a near-tie under ``adapters``."""
    if got == alone:
        return True
    a, b = eng.tokenize(got, add_bos=False), eng.tokenize(alone, add_bos=False)
    k = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
    if k >= min(len(a), len(b)):
        return False
    eng.set_adapters(adapters)
    prompt_tokens, _ = eng.render_chat(_msgs(prompt))
    logits = eng.logits(prompt_tokens + a[:k])
    return float(np.max(logits) - logits[a[k]]) < NEAR_TIE


def test_mixed_adapter_sets_decoded_together_answer_as_each_alone(eng):
    jobs = [({}, PROMPTS[0]), ({"a": 1.0}, PROMPTS[1]), ({"b": 1.0}, PROMPTS[2]), ({"a": 1.0}, PROMPTS[3])]
    alone = [_solo(eng, adapters, prompt, 24) for adapters, prompt in jobs]
    assert len(set(alone)) == 4
    got = _together(eng, jobs, 24)
    assert [[a["name"] for a in c.adapters] for _, c in got] == [[], ["a"], ["b"], ["a"]]
    assert got[0][0] == alone[0] and got[2][0] == alone[2]  # alone in their group: the same batch shape
    for (adapters, prompt), (text, _), solo in zip(jobs, got, alone):
        assert _within_rounding(eng, adapters, prompt, text, solo), (adapters, prompt, text, solo)


def test_every_decode_runs_under_the_adapter_set_of_every_sequence_in_it(eng, monkeypatch):
    """Recorded at llama.cpp's door: the set each context has at each decode vs each token's sequence."""
    sched = eng.scheduler
    applied, wrong, decodes = {}, [], [0]
    set_adapters, decode = Context.set_adapters, Context.decode

    def name_of(handle):
        return next(n for n in ("a", "b") if eng.resident[n].handle is handle)

    def recording_set(context, pairs):
        applied[context] = tuple(sorted((name_of(h), s) for h, s in pairs))
        return set_adapters(context, pairs)

    def recording_decode(context, batch):
        decodes[0] += 1
        by_seq = {slot.seq_id: slot.seq for slot in sched.slots if slot.seq is not None and slot.lane.context is context}
        for i in range(batch.n):
            seq = by_seq[batch.batch.seq_id[i][0]]
            want = tuple(sorted((name, scale) for name, _, scale in seq.key))
            if want != applied.get(context):
                wrong.append((want, applied.get(context)))
        return decode(context, batch)

    monkeypatch.setattr(Context, "set_adapters", recording_set)
    monkeypatch.setattr(Context, "decode", recording_decode)
    sched.forget_adapters()
    _together(eng, [({"a": 1.0}, PROMPTS[0]), ({}, PROMPTS[1]), ({"a": 0.5, "b": 0.5}, PROMPTS[2]),
                    ({"b": 1.0}, PROMPTS[3])], 12)
    assert decodes[0] >= 4 * 11 and not wrong


def test_cells_computed_under_one_set_are_never_reused_by_another(eng):
    """llama-server's RAM cache restores a prompt's state by tokens alone; here P asked under b and then
    under a is evaluated anew under a, and answers as a clean engine does."""
    prompt = PROMPTS[0]
    clean = _solo(eng, {"a": 1.0}, prompt, 16)
    eng.set_adapters({"b": 1.0})
    eng.chat(_msgs(prompt), max_tokens=8, **GREEDY)
    eng.set_adapters({"a": 1.0})
    eng.chat(_msgs(PROMPTS[1]), max_tokens=8, **GREEDY)
    again = eng.chat(_msgs(prompt), max_tokens=16, **GREEDY)
    assert again.text == clean
    # and the same set does reuse them: a returning conversation is not evaluated again
    follow = _msgs(prompt) + [{"role": "assistant", "content": again.text}, {"role": "user", "content": "And the sun?"}]
    later = eng.chat(follow, max_tokens=4, **GREEDY)
    assert later.cached_tokens >= again.prompt_tokens


STORIES = [f"Write a long story about {x}." for x in ("the moon", "a ship", "a forest", "a river")]


def test_a_closed_stream_frees_its_slot_at_once_and_the_others_go_on(eng):
    eng.set_adapters({})
    streams = [eng.stream_chat(_msgs(p), max_tokens=200, **GREEDY) for p in STORIES]
    for s in streams:
        next(s)
    assert len(eng.scheduler.running) == 4
    fifth = eng.stream_chat(_msgs("Name a colour."), max_tokens=4, **GREEDY)
    streams[1].close()
    assert len(eng.scheduler.running) == 3 and streams[1].completion.finish_reason == "cancelled"
    assert "".join(fifth) and fifth.completion.finish_reason in ("stop", "length")  # took the freed slot
    for s in streams:
        s.close()
    assert not eng.scheduler.running and not eng.scheduler.queue


def test_more_requests_than_slots_wait_their_turn(eng):
    eng.set_adapters({})
    streams = [eng.stream_chat(_msgs(p), max_tokens=6, **GREEDY) for p in PROMPTS + PROMPTS[:2]]
    texts = ["".join(s) for s in streams]  # read one after the other: the 5th and 6th queue, then run
    assert all(texts) and texts[4] == texts[0] and texts[5] == texts[1]


def test_a_refused_request_disturbs_no_running_answer(eng):
    alone = _solo(eng, {"b": 1.0}, PROMPTS[2], 16)
    eng.set_adapters({"b": 1.0})
    eng.reuse_prefix = False
    try:
        stream = eng.stream_chat(_msgs(PROMPTS[2]), max_tokens=16, **GREEDY)
        first = next(stream)
        with pytest.raises(ContextLengthError):
            eng.chat(_msgs("word " * 600), max_tokens=4, **GREEDY)
        with pytest.raises(Exception, match="temperature"):
            eng.chat(_msgs("hi"), temperature=9)
        assert first + "".join(stream) == alone
    finally:
        eng.reuse_prefix = True


def test_cancel_stops_every_running_answer(eng):
    eng.set_adapters({})
    streams = [eng.stream_chat(_msgs(p), max_tokens=300, **GREEDY) for p in STORIES[:3]]
    for s in streams:
        next(s)
    eng.cancel()
    for s in streams:
        "".join(s)
    assert [s.completion.finish_reason for s in streams] == ["cancelled"] * 3
    assert all(s.completion.completion_tokens < 300 for s in streams)


def test_streams_started_together_evaluate_their_prompts_in_one_decode(eng, monkeypatch):
    """Stream.start() queues a request without evaluating it: the first read runs one decode for all."""
    decodes, decode = [], Context.decode

    def recording_decode(context, batch):
        decodes.append({batch.batch.seq_id[i][0] for i in range(batch.n)})
        return decode(context, batch)

    monkeypatch.setattr(Context, "decode", recording_decode)
    eng.set_adapters({"a": 1.0})
    streams = [eng.stream_chat(_msgs(p), max_tokens=3, **GREEDY).start() for p in PROMPTS[:3]]
    assert not decodes  # queued, nothing evaluated yet
    texts = ["".join(s) for s in streams]
    assert all(texts) and len(decodes[0]) == 3, decodes


def _record_runs(monkeypatch, sched) -> list[list]:
    """Per run of decodes in a row under one (context, adapter set): [context, set, decodes in it]."""
    runs, decode = [], Context.decode

    def recording_decode(context, batch):
        key = next(lane.applied for lane in sched.lanes if lane.context is context)
        if runs and runs[-1][:2] == [context, key]:
            runs[-1][2] += 1
        else:
            runs.append([context, key, 1])
        return decode(context, batch)

    monkeypatch.setattr(Context, "decode", recording_decode)
    return runs


def _switches(monkeypatch) -> list:
    """Every set_adapters call that changes what a context has (each costs llama.cpp a re-reserve)."""
    calls, set_adapters = [], Context.set_adapters

    def recording_set(context, pairs):
        calls.append(context)
        return set_adapters(context, pairs)

    monkeypatch.setattr(Context, "set_adapters", recording_set)
    return calls


def test_each_adapter_set_running_at_once_decodes_in_a_context_of_its_own(eng, monkeypatch):
    """Three sets at once, three lanes: no context ever switches sets, so no decode pays a re-reserve,
    and the sets take turns a step at a time."""
    sched = eng.scheduler
    assert sched.max_lanes >= 3
    jobs = [({"a": 1.0}, PROMPTS[0]), ({"b": 1.0}, PROMPTS[1]), ({}, PROMPTS[2]), ({"a": 1.0}, PROMPTS[3])]
    _together(eng, jobs, 16)  # the lanes exist and each has its set: a context's first set is a switch too
    switches, runs = _switches(monkeypatch), _record_runs(monkeypatch, sched)
    got = _together(eng, jobs, 16)
    assert [[a["name"] for a in c.adapters] for _, c in got] == [["a"], ["b"], [], ["a"]]
    assert len(sched.lanes) >= 3 and not switches, switches
    assert len({id(context) for context, _, _ in runs}) == 3
    assert max(n for _, _, n in runs[:-2]) == 1, runs  # turns of one step while nobody switches


def test_adapter_sets_sharing_a_context_take_turns_of_steps_per_set_steps(smol_path, smol_adapters, monkeypatch):
    """A switch costs llama.cpp a re-reserve: sets that share a context (no lane left) run STEPS_PER_SET
    steps each before the next one's turn."""
    from edgelora.runtime.scheduler import STEPS_PER_SET

    with Engine(smol_path, n_ctx=512, parallel=2, n_threads=2, lanes=1) as one:
        one.load(smol_adapters["a"], name="a")
        one.load(smol_adapters["b"], name="b")
        runs = _record_runs(monkeypatch, one.scheduler)
        _together(one, [({"a": 1.0}, PROMPTS[0]), ({"b": 1.0}, PROMPTS[1])], 24)
    both = runs[:-1]  # the last run may be one set alone, once the other answer ended
    assert STEPS_PER_SET > 1 and len(both) >= 3 and len(one.scheduler.lanes) == 1
    assert all(n == STEPS_PER_SET for _, _, n in both[1:]), runs  # the first run began with one answer's prompt alone


def test_lanes_by_default_fit_their_kv_cells_in_a_quarter_of_free_memory(eng):
    """Each lane holds ``parallel`` sequences' KV cells: at most 3, never more than the sequences, and as
    many as fit in the share of free memory the sequences' KV may take."""
    from edgelora.runtime import loading

    per_lane = loading.kv_bytes_per_token(eng.base) * 512 * 4
    assert loading.default_lanes(eng.base, 512, 4, None) == loading.MAX_LANES == 3
    assert loading.default_lanes(eng.base, 512, 2, None) == 2
    assert loading.default_lanes(eng.base, 512, 4, int(per_lane * 2 / loading.KV_SHARE_OF_MEMORY)) == 2
    assert loading.default_lanes(eng.base, 512, 4, per_lane) == 1  # not even one fits: the context it has


def test_a_request_of_a_set_that_finds_no_lane_of_its_own_shares_the_one_hosting_fewest_sets(eng):
    """Four sets at once on three lanes: every sequence runs, none waits for a lane; two sets share one."""
    sched = eng.scheduler
    sets = [{"a": 1.0}, {"b": 1.0}, {}, {"a": 0.5, "b": 0.5}]
    got = _together(eng, list(zip(sets, PROMPTS)), 8)
    assert all(text for text, _ in got)
    assert [[(a["name"], a["scale"]) for a in c.adapters] for _, c in got] == \
        [[("a", 1.0)], [("b", 1.0)], [], [("a", 0.5), ("b", 0.5)]]
    assert len(sched.lanes) == sched.max_lanes == 3


def test_a_returning_conversation_whose_cells_sit_in_a_busy_lane_is_not_evaluated_again(smol_path, smol_adapters):
    """Its cells are in lane 0, which another set's answer now occupies: it runs in another lane, and
    its cells are copied there rather than evaluated again, and it answers as evaluated anew."""
    with Engine(smol_path, n_ctx=512, parallel=2, n_threads=2, lanes=2) as two:
        two.load(smol_adapters["a"], name="a")
        two.load(smol_adapters["b"], name="b")
        two.set_adapters({"a": 1.0})
        history = _msgs(PROMPTS[0] * 3)
        first = two.chat(history, max_tokens=12, **GREEDY)
        history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": PROMPTS[1]}]
        two.set_adapters({"b": 1.0})
        other = two.stream_chat(_msgs(PROMPTS[2]), max_tokens=40, **GREEDY)
        next(other)  # b runs in lane 0, beside a's idle cells
        two.set_adapters({"a": 1.0})
        back = two.stream_chat(history, max_tokens=8, **GREEDY)
        text = "".join(back)
        "".join(other)
        assert two.scheduler.lanes[1].slots[0].key is not None and len(two.scheduler.lanes) == 2  # it ran in lane 1
        assert back.completion.cached_tokens >= first.prompt_tokens - 1, back.completion
        two.reuse_prefix = False
        assert text == two.chat(history, max_tokens=8, **GREEDY).text


def test_a_request_beside_a_running_one_of_its_set_copies_their_shared_prefix(smol_path, smol_adapters):
    """Two clients of one set: the second arrives while the first answers, in an empty slot. The system
    prompt and template they share are copied from the running slot's cells, not evaluated again (four
    requests arriving at once paid four prompts' time for it), and it answers as evaluated anew. A
    request of another set arriving beside it copies nothing: cells are only ever shared within a set.
    (Equality is checked on the base: with the random test adapters the prefix split alone, the same
    for the long-standing reuse of an idle slot, moves logits by ~0.6 and greedy text can differ.)"""
    system = {"role": "system", "content": "You are a patient tutor who explains things to curious people. " * 4}
    with Engine(smol_path, n_ctx=512, parallel=2, n_threads=2, lanes=1) as one:
        one.load(smol_adapters["a"], name="a")
        running = one.stream_chat([system, *_msgs(PROMPTS[0])], max_tokens=30, **GREEDY)
        next(running)  # the first request now holds its slot's cells and keeps answering
        second = one.stream_chat([system, *_msgs(PROMPTS[1])], max_tokens=8, **GREEDY)
        text = "".join(second)
        "".join(running)
        assert second.completion.cached_tokens >= 50, second.completion  # 57 of its 67 prompt tokens
        one.reuse_prefix = False
        assert text == one.chat([system, *_msgs(PROMPTS[1])], max_tokens=8, **GREEDY).text
        one.reuse_prefix = True
        running = one.stream_chat([system, *_msgs(PROMPTS[0])], max_tokens=30, **GREEDY)
        next(running)
        one.set_adapters({"a": 1.0})
        other = one.stream_chat([system, *_msgs(PROMPTS[1])], max_tokens=4, **GREEDY)
        "".join(other)
        "".join(running)
        assert other.completion.cached_tokens == 0, other.completion


def test_requests_of_one_set_arriving_at_once_evaluate_their_shared_prompt_start_once(eng):
    """Four clients of one role arrive in the same step, no slot holding anything of theirs: the first
    goes ahead alone, the others wait one step and copy its cells for the system prompt and template
    they share (they evaluated it four times over in one decode before: on a compute-bound CPU the last
    first token came at ~4x one prompt's time). Each answers as evaluated alone. A request of another
    set in the same wave neither waits for them nor copies their cells."""
    system = {"role": "system", "content": "You are a patient tutor who explains things to curious people. " * 3}
    eng.set_adapters({})
    eng.scheduler.clear()
    streams = [eng.stream_chat([system, *_msgs(p)], max_tokens=6, **GREEDY).start() for p in PROMPTS]
    eng.set_adapters({"a": 1.0})
    other = eng.stream_chat([system, *_msgs(PROMPTS[0])], max_tokens=6, **GREEDY).start()
    texts = ["".join(s) for s in streams]
    "".join(other)
    cached = [s.completion.cached_tokens for s in streams]
    assert cached[0] == 0 and min(cached[1:]) >= 40, cached  # the ~45-token system part, three times
    assert other.completion.cached_tokens == 0, other.completion
    eng.set_adapters({})
    eng.reuse_prefix = False
    try:
        assert texts == [eng.chat([system, *_msgs(p)], max_tokens=6, **GREEDY).text for p in PROMPTS]
    finally:
        eng.reuse_prefix = True


def test_greedy_reads_the_token_llama_cpp_greedy_sampler_picks_at_every_batch_index(eng, monkeypatch):
    """Greedy without a penalty reads the highest logit straight from llama.cpp's buffer (runtime/llama.py
    Sampler): for three streams decoded together (outputs at several batch indices, under an adapter),
    every token equals what llama.cpp's own greedy sampler chain picks from the same logits."""
    from edgelora.runtime.llama import Sampler

    picks, sample = [], Sampler.sample

    def both(self, index):
        assert self.argmax_of is not None  # greedy, no penalty: the direct read
        fast = sample(self, index)
        direct, self.argmax_of = self.argmax_of, None
        try:
            chain = sample(self, index)
        finally:
            self.argmax_of = direct
        picks.append((index, fast, chain))
        return fast

    monkeypatch.setattr(Sampler, "sample", both)
    eng.set_adapters({"a": 1.0})
    streams = [eng.stream_chat(_msgs(f"{p} Say it twice."), max_tokens=12, **GREEDY).start() for p in PROMPTS[:3]]
    assert all("".join(s) for s in streams)
    assert [(i, f) for i, f, c in picks if f != c] == []
    assert len({i for i, _, _ in picks}) >= 3 and len({f for _, f, _ in picks}) > 5, picks  # several indices, tokens
