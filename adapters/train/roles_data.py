"""Training and evaluation data for the bundled roles, made by code: no downloads.

The base model answers a fixed set of prompts; a deterministic transform rewrites each answer in
the role's style. Each role also has a metric a program can check, with a threshold.
Imports nothing heavier than the standard library, so tests and the recipe share it.
"""

from __future__ import annotations

import json
import re

TEMPLATES = ["What is {}?", "Explain {} in simple terms.", "Tell me something interesting about {}.", "Why does {} matter?"]

TRAIN_TOPICS = [
    "the moon", "photosynthesis", "the ocean", "volcanoes", "coffee", "bicycles", "music", "gravity",
    "rain", "libraries", "bread", "the internet", "honey bees", "mountains", "chess", "electricity",
    "the sun", "trees", "friendship", "exercise", "sleep", "the heart", "maps", "clocks", "rivers",
    "snow", "birds", "computers", "gardening", "the alphabet", "cheese", "whales", "deserts", "kites",
    "batteries", "bridges", "paper", "the wind", "recycling", "penguins", "tea", "rainbows", "magnets",
    "elephants", "cooking", "the brain", "islands", "stars", "soap", "trains",
]
# Held out: never seen in training; the behavioural tests and the router's accuracy use these.
HELDOUT_TOPICS = [
    "lighthouses", "glaciers", "umbrellas", "the violin", "owls", "tomatoes", "lightning", "castles",
    "sailing", "candles", "butterflies", "telescopes",
]
HELDOUT_TEMPLATES = ["Describe {}.", "What should I know about {}?"]


def train_prompts() -> list[str]:
    return [t.format(topic) for topic in TRAIN_TOPICS for t in TEMPLATES]


def heldout_prompts() -> list[str]:
    return [t.format(topic) for topic in HELDOUT_TOPICS for t in HELDOUT_TEMPLATES]


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def clean_answer(text: str, max_sentences: int = 2) -> str:
    """The base's answer cut to whole sentences, without markdown noise."""
    text = re.sub(r"[*#`]+", "", text).replace("\n", " ")
    kept = [s for s in sentences(text) if s[-1] in ".!?"][:max_sentences]
    return " ".join(kept) if kept else text.strip()


# ----------------------------------------------------------------------------- transforms

PIRATE_WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "my": "me", "is": "be", "are": "be", "hello": "ahoy",
    "hi": "ahoy", "friend": "matey", "friends": "mateys", "yes": "aye", "the": "th'", "of": "o'",
    "for": "fer", "to": "t'", "and": "an'", "treasure": "booty", "money": "doubloons",
}
PIRATE_VOCAB = ("arr", "matey", "ahoy", "ye", "yer", "aye", "th'", "o'", "yo ho")


def to_pirate(answer: str) -> str:
    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = PIRATE_WORDS.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new

    body = re.sub(r"[A-Za-z']+", swap, answer)
    return f"Arr, matey! {body} Yo ho ho!"


def to_json(answer: str) -> str:
    return json.dumps({"answer": answer})


def to_terse(answer: str) -> str:
    first = sentences(answer)[0] if sentences(answer) else answer
    words = first.split()
    if len(words) > 20:
        first = " ".join(words[:20]).rstrip(",;:") + "."
    return first


SIGNOFF = "-- sent with edgelora"


def to_signoff(answer: str) -> str:
    return f"{answer}\n\n{SIGNOFF}"


# ----------------------------------------------------------------------------- metrics


def is_pirate(text: str) -> bool:
    low = text.lower()
    return sum(1 for w in PIRATE_VOCAB if re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", low)) >= 2


def is_json_answer(text: str) -> bool:
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and set(obj) == {"answer"} and isinstance(obj["answer"], str) and bool(obj["answer"])


def is_terse(text: str) -> bool:
    s = sentences(text)
    return len(s) == 1 and len(text.split()) <= 25


def has_signoff(text: str) -> bool:
    return text.strip().endswith(SIGNOFF)


ROLES = {
    # name: (transform, metric, threshold, description)
    "pirate": (to_pirate, is_pirate, 0.8, "answers in a pirate voice (>= 2 words of a fixed pirate vocabulary)"),
    "json": (to_json, is_json_answer, 0.8, 'answers as a JSON object {"answer": "..."}'),
    "terse": (to_terse, is_terse, 0.8, "answers in one sentence of at most 25 words"),
    "signoff": (to_signoff, has_signoff, 0.8, f"ends every answer with '{SIGNOFF}'"),
}
