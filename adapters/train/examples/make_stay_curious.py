"""Makes stay-curious.jsonl, the example of README "Make a role": 60 everyday questions, each answered
by the embedded base itself (greedy, cut to two sentences) with the closing line "Stay curious!".

The style check, fixed before training: an answer has the style when its last line is "Stay curious!"
(has_style below). `edgelora roles train curious --data stay-curious.jsonl --eval 20` holds out 20.
COUNT = 60 of the 100 topics: answering 100 took over 15 minutes on this (heavily loaded) machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIGNOFF = "Stay curious!"
TOPICS = [
    "the moon", "photosynthesis", "volcanoes", "coffee", "bicycles", "gravity", "rain", "libraries", "bread",
    "honey bees", "chess", "electricity", "trees", "sleep", "the heart", "maps", "clocks", "rivers", "snow",
    "computers", "gardening", "cheese", "whales", "deserts", "kites", "batteries", "bridges", "paper", "the wind",
    "recycling", "penguins", "tea", "rainbows", "magnets", "elephants", "the brain", "islands", "stars", "soap",
    "trains", "lighthouses", "glaciers", "umbrellas", "the violin", "owls", "tomatoes", "lightning", "castles",
    "sailing", "candles", "butterflies", "telescopes", "earthquakes", "dolphins", "pizza", "the piano", "bats",
    "tides", "fungi", "salt", "glass", "windmills", "the Arctic", "ants", "pottery", "rice", "hurricanes",
    "the compass", "frogs", "marathons", "chocolate", "caves", "the eye", "yoga", "satellites", "coral reefs",
    "the printing press", "wolves", "lemons", "fog", "origami", "the Sahara", "submarines", "sunflowers",
    "thunder", "camels", "yogurt", "the Olympics", "parrots", "bamboo", "vaccines", "comets", "knitting",
    "octopuses", "the Nile", "helicopters", "mushrooms", "jazz", "solar panels", "dinosaurs",
]
COUNT = 60
TEMPLATES = ["What is {}?", "Tell me about {}.", "Why is {} interesting?", "Describe {}.", "What should I know about {}?"]


def has_style(answer: str) -> bool:
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return bool(lines) and lines[-1] == SIGNOFF


def prompts() -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(t) for i, t in enumerate(TOPICS)][:COUNT]


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from roles_data import clean_answer

    from edgelora import Engine

    engine = Engine(n_ctx=1024, reuse_prefix=False)
    with open(HERE / "stay-curious.jsonl", "w") as out:
        for p in prompts():
            text = engine.chat([{"role": "user", "content": p}], max_tokens=64, temperature=0, seed=0).text
            out.write(json.dumps({"prompt": p, "answer": f"{clean_answer(text)}\n\n{SIGNOFF}"}) + "\n")


if __name__ == "__main__":
    assert len(TOPICS) == 100 and len(set(TOPICS)) == 100, len(TOPICS)
    main()
