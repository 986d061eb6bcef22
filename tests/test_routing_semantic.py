"""`--role auto` by meaning: the numpy MiniLM equals the reference implementation, the threshold is
the one the development set gives, and the held-out evaluation set (tests/routing/eval.toml, never
used for fitting) is routed well, better than the old TF-IDF router on the same prompts."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgelora import router
from edgelora._toml import tomllib
from edgelora.roles import RoleCatalog, bundled_dir

from .conftest import write_role

HERE = Path(__file__).parent / "routing"
LABELS = ["pirate", "json", "terse", "signoff", "base"]


def labelled(name: str) -> list[tuple[str, str]]:
    data = tomllib.loads((HERE / name).read_text())
    return [(p, role) for role, prompts in data.items() for p in prompts]


@pytest.fixture(scope="module")
def roles():
    return RoleCatalog([bundled_dir()]).roles()


def test_numpy_minilm_equals_the_reference_model():
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    from edgelora.embedder import embedder, model_dir

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    ref = AutoModel.from_pretrained(str(model_dir())).eval()
    for text in ["One line only: what does a CPU do?", "How does a refrigerator keep food cold?"]:
        with torch.no_grad():
            out = ref(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
        assert float(embedder().embed(text) @ (out / np.linalg.norm(out))) > 0.9999


def test_the_shipped_threshold_is_the_one_the_dev_set_gives(roles):
    assert router.fit_threshold(labelled("dev.toml"), roles) == pytest.approx(router.SEMANTIC_THRESHOLD, abs=0.005)


def test_eval_set_is_held_out_and_big_enough(roles):
    ev, dev = labelled("eval.toml"), labelled("dev.toml")
    assert len(ev) >= 80 and sum(r == "base" for _, r in ev) >= len(ev) / 3
    examples = {e.lower() for r in roles for e in r.examples}
    assert not {p.lower() for p, _ in ev} & (examples | {p.lower() for p, _ in dev})


def evaluate(roles, method: str) -> tuple[float, float, Counter]:
    ev = labelled("eval.toml")
    got = [(want, router.route(p, roles, method=method).role) for p, want in ev]
    neutral = [g for w, g in got if w == "base"]
    return sum(w == g for w, g in got) / len(got), sum(g != "base" for g in neutral) / len(neutral), Counter(got)


def test_routing_by_meaning_on_the_held_out_set(roles, capsys):
    acc, false_route, table = evaluate(roles, "meaning")
    old_acc, old_false, _ = evaluate(roles, "tfidf")
    with capsys.disabled():
        print(f"\n[routing] meaning: accuracy {acc:.1%}, neutral->style {false_route:.1%}; "
              f"TF-IDF: accuracy {old_acc:.1%}, neutral->style {old_false:.1%}")
        print("[routing] want\\got " + " ".join(LABELS))
        for want in LABELS:
            print(f"[routing] {want:<8} " + " ".join(f"{table[(want, g)]:>3}" for g in LABELS))
    assert acc >= 0.80 and false_route <= 0.15  # measured 83.3% and 11.1%
    assert acc > old_acc + 0.15


@pytest.mark.parametrize("prompt, role", [
    ("One line only: what does a CPU do?", "terse"),
    ("Quick answer, no details: is tomato a fruit?", "terse"),
    ("How does a refrigerator keep food cold?", "base"),
])
def test_the_issue_s_prompts(roles, prompt, role):
    chosen = router.route(prompt, roles)
    assert chosen.role == role and chosen.reason


def test_a_manifest_adds_examples_without_code(tmp_path, smol_adapters):
    write_role(tmp_path, "poet", smol_adapters["a"],
               routing='examples = ["Write a haiku about the rain.", "Answer in rhyming verse: what is snow?"]')
    catalog = RoleCatalog([bundled_dir(), tmp_path])
    assert router.route("Could you put your reply into a little poem: what is wind?", catalog.roles()).role == "poet"


def test_without_the_model_package_word_overlap_is_used_and_said(roles, monkeypatch):
    from edgelora import embedder

    def missing():
        raise embedder.EmbedderMissing("the routing model is not installed")

    monkeypatch.setattr(embedder, "model_dir", missing)
    embedder.embedder.cache_clear()
    embedder.embed.cache_clear()
    try:
        chosen = router.route("What is the capital of Peru?", roles)
        assert chosen.role == "base" and "word overlap" in chosen.reason
    finally:
        embedder.embedder.cache_clear()
        embedder.embed.cache_clear()


def test_the_model_loads_only_when_auto_is_used():
    code = ("from edgelora import Engine, Roles, embedder; e = Engine(); r = Roles(e); r.use('pirate'); "
            "r.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2); print(embedder.embedder.cache_info().currsize); "
            "r.use('auto'); r.chat([{'role': 'user', 'content': 'hi'}], max_tokens=2); print(embedder.embedder.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "1"], out.stderr[-300:]
