"""The routing embedder (edgelora/routing/embedder.py): texts stacked into one pass give what they give
alone, the in-place arithmetic never touches the weights, and its cache never loses a text in use."""

from __future__ import annotations

import numpy as np
import pytest

from edgelora.routing import embedder

SHORT = "hi"
LONG = "Explain photosynthesis in buccaneer speak, then sign off with a short rhyme about the sea."
MIDDLE = "One line only: what does a CPU do?"


@pytest.mark.parametrize("batch", [
    [SHORT, LONG],  # a one-word text beside a long one: unmasked, each would attend to the other's words
    [LONG, SHORT, MIDDLE],
    [MIDDLE, MIDDLE + " ", LONG, SHORT],  # near-identical texts in one pass
])
def test_a_text_stacked_with_others_embeds_as_it_does_alone(batch):
    model = embedder.embedder()
    together = model.embed_many(batch)
    for text, vector in zip(batch, together):
        alone = model.embed_many([text])[0]
        assert np.abs(vector - alone).max() < 1e-6, text


def test_embedding_the_same_text_again_gives_the_same_vector():
    # the forward pass works in place on its activations: a slip that wrote into a weight would change
    # every later embedding
    model = embedder.embedder()
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
    assert np.abs(got[0] - embedder.embedder().embed(SHORT)).max() < 1e-6
