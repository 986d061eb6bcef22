"""Numerical reference: a runtime-attached LoRA computes what the merged weights compute."""

import numpy as np
import pytest

from edgelora import Engine

PROMPTS = ["The quick brown fox", "Hello, my name is", "1 2 3 4"]


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    eng = Engine(tiny["base"], n_ctx=256)
    yield eng
    eng.close()


def _logits(path, prompts):
    with Engine(path, n_ctx=256) as eng:
        return [eng.logits(eng.tokenize(p)) for p in prompts]


def _close(got, want):
    # F32 everywhere; the only difference is the order of additions (W x + s B A x vs (W + s B A) x).
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_attached_adapter_matches_merged_model(tiny, tiny_engine):
    s1, _ = tiny["scales"]
    base = [tiny_engine.logits(tiny_engine.tokenize(p)) for p in PROMPTS]
    tiny_engine.attach(tiny["lora1"], name="l1", scale=s1)
    got = [tiny_engine.logits(tiny_engine.tokenize(p)) for p in PROMPTS]
    tiny_engine.detach_all()
    want = _logits(tiny["merged1"], PROMPTS)
    for g, w, b in zip(got, want, base):
        assert np.abs(w - b).max() > 0.1  # the adapter really changes the logits
        _close(g, w)


def test_two_stacked_adapters_match_merged_model(tiny, tiny_engine):
    s1, s2 = tiny["scales"]
    tiny_engine.attach(tiny["lora1"], name="l1", scale=s1)
    tiny_engine.attach(tiny["lora2"], name="l2", scale=s2)
    got = [tiny_engine.logits(tiny_engine.tokenize(p)) for p in PROMPTS]
    tiny_engine.detach_all()
    want = _logits(tiny["merged12"], PROMPTS)
    only1 = _logits(tiny["merged1"], PROMPTS)
    for g, w, o in zip(got, want, only1):
        assert np.abs(w - o).max() > 0.05  # the second adapter contributes
        _close(g, w)


def test_detach_gives_back_base_logits_exactly(tiny, tiny_engine):
    tokens = tiny_engine.tokenize(PROMPTS[0])
    before = tiny_engine.logits(tokens)
    tiny_engine.attach(tiny["lora1"], name="l1", scale=1.0)
    with_adapter = tiny_engine.logits(tokens)
    tiny_engine.detach("l1")
    after = tiny_engine.logits(tokens)
    assert not np.array_equal(before, with_adapter)
    assert np.array_equal(before, after)


def test_scale_zero_equals_base_and_scale_is_linear(tiny, tiny_engine):
    tokens = tiny_engine.tokenize(PROMPTS[1])
    base = tiny_engine.logits(tokens)
    tiny_engine.attach(tiny["lora1"], name="l1", scale=0.0)
    zero = tiny_engine.logits(tokens)
    tiny_engine.set_scale("l1", 0.8)
    got = tiny_engine.logits(tokens)
    tiny_engine.detach_all()
    np.testing.assert_allclose(zero, base, rtol=0, atol=1e-5)
    _close(got, _logits(tiny["merged1"], [PROMPTS[1]])[0])
