"""Pick a role for a prompt, with a reason: an explicit mention, then the manifests' keyword and
regex rules, then similarity to each role's example prompts, else the base.

Similarity is TF-IDF cosine over words (a local method: no model call, deterministic, instant)."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import regex

from .roles import BASE_ROLE, Role

_WORD = re.compile(r"[a-z0-9']+")
_STOP = set("a an the is are was were be to of in on for and or it this that me my i you your do does what "
            "how why please can could would tell about give with as at by from".split())


@dataclass(frozen=True)
class Route:
    role: str
    reason: str
    score: float = 1.0


def _terms(text: str) -> list[str]:
    return [w.rstrip("s") if len(w) > 3 else w for w in _WORD.findall(text.lower()) if w not in _STOP]


def route(prompt: str, roles: list[Role], threshold: float = 0.25) -> Route:
    low = prompt.lower()
    names = {r.name.lower(): r.name for r in roles}
    mention = re.search(r"(?:^|\s)@([a-z0-9][a-z0-9_.-]*)", low) or re.search(r"\b(?:as|in) (?:the |a )?([a-z0-9_.-]+) role\b", low)
    if mention and mention.group(1) in names:
        return Route(names[mention.group(1)], f"explicit mention '{mention.group(0).strip()}'")
    if mention and mention.group(1) == BASE_ROLE:
        return Route(BASE_ROLE, f"explicit mention '{mention.group(0).strip()}'")

    hits: list[tuple[int, str, str]] = []
    for role in roles:
        for kw in role.keywords:
            if re.search(rf"(?<![a-z0-9]){re.escape(kw.lower())}(?![a-z0-9])", low):
                hits.append((len(kw), role.name, f"keyword '{kw}'"))
        for pattern in role.regex:
            if _regex_hit(pattern, prompt, role):
                hits.append((100, role.name, f"rule /{pattern}/"))
    if hits:
        _, name, reason = max(hits)  # a regex rule, then the longest keyword, wins
        return Route(name, reason)

    best = _most_similar(prompt, roles)
    if best and best[0] >= threshold:
        score, name, example = best
        return Route(name, f"similar to example '{example}' ({score:.2f})", score)
    return Route(BASE_ROLE, "no rule matched and no example is similar enough", best[0] if best else 0.0)


def _most_similar(prompt: str, roles: list[Role]) -> tuple[float, str, str] | None:
    docs = [(role.name, ex, Counter(_terms(ex))) for role in roles for ex in role.examples]
    if not docs:
        return None
    df = Counter(t for _, _, terms in docs for t in terms)
    n = len(docs)

    def vec(terms: Counter) -> dict[str, float]:
        return {t: c * math.log((1 + n) / (1 + df.get(t, 0))) + 1 for t, c in terms.items()}

    q = vec(Counter(_terms(prompt)))
    qn = math.sqrt(sum(v * v for v in q.values())) or 1.0
    best = None
    for name, example, terms in docs:
        d = vec(terms)
        dn = math.sqrt(sum(v * v for v in d.values())) or 1.0
        score = sum(q[t] * d.get(t, 0.0) for t in q) / (qn * dn)
        if best is None or score > best[0]:
            best = (score, name, example)
    return best


REGEX_BUDGET_S = 0.05  # a manifest's rule must not hang routing (e.g. '^(a+)+$' backtracking)


def _regex_hit(pattern: str, prompt: str, role) -> bool:
    try:
        return regex.search(pattern, prompt, regex.IGNORECASE, timeout=REGEX_BUDGET_S) is not None
    except TimeoutError:
        from .roles import RoleError

        raise RoleError(f"{role.path}: routing.regex {pattern!r} took over {REGEX_BUDGET_S * 1e3:.0f} ms on this "
                        "prompt (catastrophic backtracking?); simplify it") from None
