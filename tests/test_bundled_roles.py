"""The bundled roles change the model's behaviour in ways a program can measure, on held-out
prompts (topics never seen in training), with the real model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgelora import Engine
from edgelora.config import Config
from edgelora.roles import RoleCatalog, bundled_dir
from edgelora.session import Roles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters" / "train"))
import roles_data  # noqa: E402

PROMPTS = roles_data.heldout_prompts()
MAX_TOKENS = 96
BASE_CEILING = 0.2  # the base alone stays far below every threshold


def answers(roles: Roles, specs) -> list[str]:
    roles.use(specs)
    out = []
    for p in PROMPTS:
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


def test_stacked_roles_combine(roles, capsys):
    """pirate + signoff stacked at full weight: pirate voice and the sign-off together (documented)."""
    texts = answers(roles, ["pirate", "signoff"])
    pirate, signoff = rate(roles_data.is_pirate, texts), rate(roles_data.has_signoff, texts)
    half = answers(roles, ["pirate:0.5", "json:0.5"])
    half_pirate, half_json = rate(roles_data.is_pirate, half), rate(roles_data.is_json_answer, half)
    with capsys.disabled():
        print(f"\n[stack] pirate+signoff: pirate {pirate:.0%}, signoff {signoff:.0%}; "
              f"pirate:0.5+json:0.5: pirate {half_pirate:.0%}, json {half_json:.0%}")
    assert pirate >= 0.5 and signoff >= 0.5
    assert half_pirate + half_json <= 1.5  # at half weight neither style fully holds


def test_detaching_gives_back_exact_base_behaviour(roles, base_answers, smol_path):
    answers(roles, ["pirate:0.7", "terse:0.3"])
    after = answers(roles, ["base"])
    assert after == base_answers
    with Engine(smol_path, n_ctx=1024) as fresh:
        p = PROMPTS[0]
        assert fresh.chat([{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0.0, seed=0).text == after[0]
