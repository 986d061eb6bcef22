"""The bundled roles change the model's behaviour in ways a program can measure, on held-out
prompts (topics never seen in training), with the real model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgelora import Engine
from edgelora.config import Config
from edgelora.roles.manifest import RoleCatalog, bundled_dir
from edgelora.roles.session import Roles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters" / "train"))
import roles_data  # noqa: E402

PROMPTS = roles_data.heldout_prompts()
MAX_TOKENS = 96
BASE_CEILING = 0.2  # the base alone stays far below every threshold


def answers(roles: Roles, specs, prompts=PROMPTS) -> list[str]:
    roles.use(specs)
    out = []
    for p in prompts:
        roles.engine.new_conversation()
        out.append(roles.chat([{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0.0, seed=0).text)
    return out


def rate(metric, texts) -> float:
    return sum(map(metric, texts)) / len(texts)


@pytest.fixture(scope="module")
def roles(smol_path):
    eng = Engine(smol_path, n_ctx=1024)
    yield Roles(eng, Config(), catalog=RoleCatalog([bundled_dir()]))
    eng.close()


@pytest.fixture(scope="module")
def base_answers(roles):
    return answers(roles, ["base"])


@pytest.mark.parametrize("role", list(roles_data.ROLES))
def test_role_clears_its_metric_and_the_base_does_not(role, roles, base_answers, capsys):
    _, metric, threshold, description = roles_data.ROLES[role]
    with_role = rate(metric, answers(roles, [role]))
    base = rate(metric, base_answers)
    with capsys.disabled():
        print(f"\n[role] {role:<8} {description}: {with_role:.0%} with the adapter, {base:.0%} base "
              f"(threshold {threshold:.0%}, {len(PROMPTS)} held-out prompts)")
    assert with_role >= threshold
    assert base <= BASE_CEILING


def test_half_weight_is_in_between(roles, capsys):
    """pirate at 0.5: some answers in pirate voice, fewer than at 1.0 (100%) and more than the base (0%)."""
    half = rate(roles_data.is_pirate, answers(roles, ["pirate:0.5"]))
    with capsys.disabled():
        print(f"\n[stack] pirate:0.5 alone: pirate {half:.0%}")
    assert 0.2 <= half <= 0.9


def test_stacked_roles_share_the_answers(roles, capsys):
    """pirate + terse at full weight (documented): both styles appear, each less often than alone."""
    texts = answers(roles, ["pirate", "terse"])
    pirate, terse = rate(roles_data.is_pirate, texts), rate(roles_data.is_terse, texts)
    with capsys.disabled():
        print(f"\n[stack] pirate+terse: pirate {pirate:.0%}, terse {terse:.0%}")
    assert 0.4 <= pirate <= 0.95
    assert 0.05 <= terse <= 0.6


def test_detaching_gives_back_exact_base_behaviour(roles, base_answers, smol_path):
    answers(roles, ["pirate:0.7", "terse:0.3"], PROMPTS[:4])
    after = answers(roles, ["base"], PROMPTS[:4])
    assert after == base_answers[:4]
    with Engine(smol_path, n_ctx=1024) as fresh:
        p = PROMPTS[0]
        assert fresh.chat([{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0.0, seed=0).text == after[0]


@pytest.mark.parametrize("role", list(roles_data.ROLES))
def test_bundled_gguf_is_the_conversion_of_its_peft_source(role, tmp_path, smol_path):
    import gguf

    from edgelora.convert import convert_peft

    out = convert_peft(bundled_dir() / role, smol_path, tmp_path / f"{role}.gguf", outtype="f16", name=role)
    assert len(out.tensors) == 90  # q, v, o in 30 layers
    ours = {t.name: t.data.tobytes() for t in gguf.GGUFReader(tmp_path / f"{role}.gguf").tensors}
    shipped = {t.name: t.data.tobytes() for t in gguf.GGUFReader(bundled_dir() / f"{role}.gguf").tensors}
    assert ours == shipped
