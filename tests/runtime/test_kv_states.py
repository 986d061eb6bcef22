"""Switching back to an adapter set mid-conversation restores its KV state: only new tokens are
evaluated, and the answer is exactly what a fresh evaluation gives."""

from edgelora import Engine

from ..conftest import GREEDY

TURNS = [
    "Tell me about the sea in two sentences.",
    "Now tell me about mountains.",
    "Which of the two would you rather visit?",
]


def _converse(eng, history, switch):
    """One turn per TURNS entry; `switch(i)` sets the adapters before turn i."""
    outs = []
    for i, question in enumerate(TURNS):
        switch(i)
        history.append({"role": "user", "content": question})
        out = eng.chat(history, max_tokens=24, **GREEDY)
        history.append({"role": "assistant", "content": out.text})
        outs.append(out)
    return outs


def test_switch_back_reuses_state_and_matches_fresh(smol_path, smol_adapters):
    with Engine(smol_path, n_ctx=1024) as eng:
        eng.load(smol_adapters["a"], name="a")
        eng.load(smol_adapters["b"], name="b")
        plan = [{"a": 1.0}, {"b": 1.0}, {"a": 1.0}]
        history: list = []
        outs = _converse(eng, history, lambda i: eng.set_adapters(plan[i]))
        assert [key[0][0] for key in eng.kv_states.keys()] == ["a", "b"]  # B's state is kept while A runs

    # turn 3 under A: the state saved after turn 1 is reused, so only the turns since are evaluated
    first_turn_tokens = outs[0].prompt_tokens + outs[0].completion_tokens
    assert outs[2].cached_tokens >= first_turn_tokens - 1
    assert outs[2].cached_tokens < outs[2].prompt_tokens

    # and it is what a fresh engine with A computes for the same conversation. Not a bitwise claim:
    # the fresh engine evaluates the history in other batch sizes, which round differently in
    # llama.cpp (README "Reproducibility"); for this conversation no near-tie flips, and a state
    # saved under B instead of A would give another answer.
    with Engine(smol_path, n_ctx=1024, kv_cache_bytes=0) as fresh:
        fresh.attach(smol_adapters["a"], name="a")
        again = fresh.chat(history[:-1], max_tokens=24, **GREEDY)
        assert again.cached_tokens == 0
    assert again.text == outs[2].text


def test_without_state_cache_switch_back_re_evaluates(smol_path, smol_adapters):
    with Engine(smol_path, n_ctx=1024, kv_cache_bytes=0) as eng:
        eng.load(smol_adapters["a"], name="a")
        eng.load(smol_adapters["b"], name="b")
        plan = [{"a": 1.0}, {"b": 1.0}, {"a": 1.0}]
        outs = _converse(eng, [], lambda i: eng.set_adapters(plan[i]))
    assert outs[2].cached_tokens == 0


def test_state_cache_respects_its_budget_and_free(smol_path, smol_adapters):
    with Engine(smol_path, n_ctx=1024, kv_cache_bytes=4 << 20) as eng:
        eng.load(smol_adapters["a"], name="a")
        eng.load(smol_adapters["b"], name="b")
        eng.load(smol_adapters["c"], name="c")
        plan = [{"a": 1.0}, {"b": 1.0}, {"c": 1.0}]
        _converse(eng, [], lambda i: eng.set_adapters(plan[i]))
        assert 0 < eng.kv_states.nbytes <= 4 << 20
        keys = eng.kv_states.keys()
        eng.free("b")
        assert all(item[0] != "b" for key in eng.kv_states.keys() for item in key)
        assert len(eng.kv_states) <= len(keys)


def test_the_context_in_use_is_what_the_kv_cache_holds_and_a_switch_back_restores_it(smol_path, smol_adapters):
    """Engine.context_used (the TUI's "ctx used/size") counts the cells the context holds now."""
    with Engine(smol_path, n_ctx=256) as eng:
        assert (eng.context_used, eng.context_size) == (0, 256)
        out = eng.complete("The sea is", max_tokens=6, **GREEDY)
        held = eng.context_used
        # every prompt token and every sampled token but the last, which was never decoded
        assert held == out.prompt_tokens + out.completion_tokens - (out.finish_reason == "length")
        eng.attach(smol_adapters["a"], name="a")
        eng.complete("Mountains", max_tokens=2, **GREEDY)
        assert eng.context_used < held  # the other set's cells were put aside...
        eng.detach("a")
        again = eng.complete("The sea is", max_tokens=1, **GREEDY)  # ...and are back under the first set
        assert again.cached_tokens == again.prompt_tokens - 1
    assert eng.context_used == 0 and eng.context_size == 0  # closed


def test_a_conversation_returning_after_another_of_its_set_took_its_slot_is_not_re_evaluated(smol_path):
    """More conversations of one role than slots (a server's clients taking turns): the slot's cells
    are saved when another conversation of the same set takes them, and put back when the first
    returns (only the one saved state per set was kept before, and a slot of the same set was cut
    without saving). The answer is what a fresh evaluation gives."""
    with Engine(smol_path, n_ctx=1024) as eng:  # one slot
        x = [{"role": "user", "content": TURNS[0]}]
        first = eng.chat(x, max_tokens=16, **GREEDY)
        x += [{"role": "assistant", "content": first.text}, {"role": "user", "content": TURNS[1]}]
        y = eng.chat([{"role": "user", "content": "Name three birds that cannot fly."}], max_tokens=16, **GREEDY)
        assert y.cached_tokens < first.prompt_tokens - 5, y  # only the default system prompt is shared
        back = eng.chat(x, max_tokens=16, **GREEDY)
        assert back.cached_tokens >= first.prompt_tokens + first.completion_tokens - 2, back
        assert len(eng.kv_states) >= 1
        eng.reuse_prefix = False
        assert eng.chat(x, max_tokens=16, **GREEDY).text == back.text


def test_saved_states_per_set_longest_start_wins_a_longer_one_replaces_its_start_within_budget():
    import numpy as np

    from edgelora.runtime.kv import KVStateCache
    from edgelora.runtime.llama import SeqState

    def state(tokens, size=100):
        return SeqState(np.array(tokens, dtype=np.int32), bytes(size))

    a, b = (("a", 1, 1.0),), (("b", 2, 1.0),)
    cache = KVStateCache(1000)
    cache.put(a, state([1, 2, 3]))
    cache.put(a, state([1, 2, 3, 4, 5]))  # the same conversation, longer: replaces it
    cache.put(a, state([1, 2]))  # held in full already: adds nothing
    cache.put(a, state([1, 9, 9]))  # another conversation of the set
    cache.put(b, state([1, 2, 3, 4, 5, 6]))
    assert cache.keys() == [a, a, b]
    shared, got = cache.best(a, [1, 2, 3, 4, 7])
    assert shared == 4 and list(got.tokens) == [1, 2, 3, 4, 5]  # never b's, though b's shares as much
    assert cache.best(a, [5, 5]) == (0, None)
    for i in range(10):  # within the budget, the least recently used go first
        cache.put(b, state([100 + i]))
    assert cache.nbytes <= 1000 and cache.best(a, [1, 2, 3]) == (0, None)
