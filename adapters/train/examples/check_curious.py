"""Judges the `curious` role made in README "Make a role": on the 20 pairs `--eval 20 --seed 0` held out,
the share of greedy answers whose last line is "Stay curious!" (has_style), with the role and without,
and whether the base answers exactly as before once the role is detached.

    edgelora roles train curious --data stay-curious.jsonl --eval 20
    python check_curious.py
"""

from __future__ import annotations

from pathlib import Path

from make_stay_curious import has_style

from edgelora import Engine
from edgelora.config import load_config
from edgelora.roles import RoleCatalog
from edgelora.session import default_folders
from edgelora.train.data import load_examples, split

HERE = Path(__file__).resolve().parent

_, held = split(load_examples(HERE / "stay-curious.jsonl"), 20, 0)
role = RoleCatalog(default_folders(load_config())).get("curious")
engine = Engine(n_ctx=1024, reuse_prefix=False)  # no prefix reuse: greedy answers repeat exactly


def answers(pairs) -> list[str]:
    return [engine.chat(p.messages(), max_tokens=96, temperature=0, seed=0).text for p in pairs]


FEW = 5  # base answers before attaching and after detaching, compared (this machine is slow)
before = answers(held[:FEW])
engine.attach(role.adapters[0].file, name="curious")
styled = answers(held)
engine.detach("curious", free=True)
after = answers(held[:FEW])
print(f"style with the role: {sum(map(has_style, styled))}/{len(held)}; base: {sum(map(has_style, before))}/{FEW}")
print(f"base unchanged after detach: {sum(a == b for a, b in zip(before, after))}/{FEW} greedy answers identical")
for p, b, s in list(zip(held, before, styled))[:2]:
    print(f"\n{p.prompt}\n  base: {b!r}\n  role: {s!r}")
