"""The routing embedder, both passes (numpy: edgelora/routing/embedder.py; llama.cpp on a GGUF made from
the same weights: embedder_gguf.py): texts stacked into one pass give what they give alone, the passes
agree, the in-place arithmetic never touches the weights, the GGUF is made once, and the cache never
loses a text in use."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.routing import embedder, embedder_gguf

SHORT = "hi"
LONG = "Explain photosynthesis in buccaneer speak, then sign off with a short rhyme about the sea."
MIDDLE = "One line only: what does a CPU do?"


@pytest.fixture(scope="module", params=["numpy", "llama.cpp"])
def model(request):
    folder = embedder.model_dir()
    return embedder.MiniLM(folder) if request.param == "numpy" else embedder_gguf.GgufMiniLM(folder)


@pytest.mark.parametrize("batch", [
    [SHORT, LONG],  # a one-word text beside a long one: unmasked, each would attend to the other's words
    [LONG, SHORT, MIDDLE],
    [MIDDLE, MIDDLE + " ", LONG, SHORT],  # near-identical texts in one pass
])
def test_a_text_stacked_with_others_embeds_as_it_does_alone(model, batch):
    together = model.embed_many(batch)
    for text, vector in zip(batch, together):
        alone = model.embed_many([text])[0]
        assert float(vector @ alone) > 0.99999, text  # unmasked, the texts of a pass attend to each other


def test_embedding_the_same_text_again_gives_the_same_vector(model):
    # the numpy pass works in place on its activations: a slip that wrote into a weight would change
    # every later embedding
    first = model.embed_many([MIDDLE, LONG])
    model.embed_many([SHORT, LONG, MIDDLE] * 4)
    assert np.array_equal(model.embed_many([MIDDLE, LONG]), first)


def test_a_full_cache_still_returns_every_text_asked_for(monkeypatch):
    monkeypatch.setattr(embedder, "_CACHE_MAX", 3)
    monkeypatch.setattr(embedder, "_CACHE", {})
    embedder.embed_many([SHORT, MIDDLE])
    # one text cached, two new: the cache is full, is cleared, and the cached one must come back too
    got = embedder.embed_many([SHORT, LONG, "a third text"])
    assert got.shape == (3, 384)
    assert float(got[0] @ embedder.embedder().embed(SHORT)) > 0.99999


def test_the_llama_cpp_pass_gives_the_numpy_vectors():
    folder = embedder.model_dir()
    texts = [SHORT, LONG, MIDDLE, "Réponds en français : qu'est-ce qu'un volcan ?", "word " * 300]  # accents; cut at 128 tokens
    by_numpy = embedder.MiniLM(folder).embed_many(texts)
    by_llama = embedder_gguf.GgufMiniLM(folder).embed_many(texts)
    assert (by_numpy * by_llama).sum(1).min() > 0.99999


def test_the_gguf_is_made_once_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELORA_CACHE_DIR", str(tmp_path))
    folder = embedder.model_dir()
    first = embedder_gguf.GgufMiniLM(folder).embed(MIDDLE)
    made = embedder_gguf.gguf_path(folder)
    assert made.parent.parent == tmp_path and [p.name for p in made.parent.iterdir()] == [made.name]
    stamp = made.stat().st_mtime_ns
    assert np.array_equal(embedder_gguf.GgufMiniLM(folder).embed(MIDDLE), first)
    assert made.stat().st_mtime_ns == stamp


def test_routing_uses_the_numpy_pass_when_the_gguf_cannot_be_made(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("EDGELORA_CACHE_DIR", str(blocked))
    embedder.clear_cache()
    try:
        assert isinstance(embedder.embedder(), embedder.MiniLM)
        assert embedder.embed(MIDDLE).shape == (384,)
    finally:
        embedder.clear_cache()
