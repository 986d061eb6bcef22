"""Pick a role for a prompt, with a reason. `--role auto` routes by the manner a prompt ASKS for, not
the subject it MENTIONS ("answer in Spanish" vs "Spanish history"). The decision, in order:

1. an explicit mention (`@json`, "as the pirate role"), then the manifests' regex rules and the keywords
   of roles *without* examples: the rule decides;
2. a keyword of a role with examples that the request *frames* (request_frame.py: "in Spanish", "write a
   limerick", "Briefly, …"): that role (several: the nearest by meaning);
3. else by meaning: the (piece of the prompt, role) pair that stands out most from plain requests
   — pieces that are plain questions ("how do I end an email?", `plain_question`) left out: a
   question about a subject asks for no manner, however like a role's examples its subject is —
   (`most_similar_meaning`: role centroids in embedding space minus the plain-request direction) must
   clear SEMANTIC_THRESHOLD (FEW_EXAMPLES_THRESHOLD for a role with <= FEW_EXAMPLES examples), and then
   pass the checks below; only a role with few examples whose own classifier (below) is sure of a request
   for its manner (logit >= ASKS_SURE) is chosen at once, if it stands out at all (score >= 0):
   - if the prompt only *mentions* that role's keyword (unframed), another role whose manner is asked
     for may win instead (it clears the bar and MENTIONED_NEXT_MANNER);
   - the prompt must be nearer the role's examples than plain requests, small talk and plain questions
     about its subject (`manner_score` >= MEANING_MANNER_GATE). (A stricter bar for a prompt that
     mentions the role's keyword, MENTIONED_MANNER 0.15, went once plain questions were left out:
     kept, it cost 8 asks on the dev sets for 1 false route);
   - a role with few examples (users write 3-5) needs its own classifier's agreement too: a logistic
     regression on MiniLM embeddings fitted when the role set is first embedded (`_fit_asks`: positives
     = its examples, their style parts and those style parts joined to plain requests; negatives = plain
     requests, plain questions about its keywords, the other roles' examples), logit >= ASKS_LOGIT;
4. else base.

Meaning: sentence embeddings from a small local model (embedder.py: all-MiniLM-L6-v2 in numpy, loaded
on first use, nothing downloaded). Without that package the older TF-IDF word overlap is used (keyword
rules for every role, then word overlap with the examples), and the reason says so. Every constant was
fitted on the development sets (tests/routing/dev*.toml; `measure.py --dev`), never on the held-out
ones (eval.toml, heldout_user_roles.toml)."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import regex

from edgelora.roles.manifest import BASE_ROLE, Role
from edgelora.routing import request_frame
from edgelora.routing.embedder import EmbedderMissing

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


SEMANTIC_THRESHOLD = 0.14  # fit_threshold() on tests/routing/dev.toml (a test re-fits and compares)
TFIDF_THRESHOLD = 0.25


def route(prompt: str, roles: list[Role], threshold: float | None = None, *, method: str = "meaning") -> Route:
    """``threshold``: least similarity that picks a role (default: the fitted one for the method)."""
    if method == "meaning":
        rule = _rules(prompt, roles, keywords_of_roles_with_examples=False)
        if rule is not None:
            return rule
        asked, mentioned = keyword_frames(prompt, roles)
        try:
            if asked:
                return _asked_for(prompt, roles, asked)
            return _by_meaning(prompt, roles, SEMANTIC_THRESHOLD if threshold is None else threshold,
                               mentioned=mentioned)
        except EmbedderMissing as exc:
            if asked:
                role, hit = asked[0]
                return Route(role.name, f"keyword '{hit.keyword}' asked for: {hit.framed}")
            fallback = f" (word overlap; {exc})"
    else:
        fallback = ""
    rule = _rules(prompt, roles)
    if rule is not None:
        return rule
    best = _most_similar(prompt, roles)
    limit = TFIDF_THRESHOLD if threshold is None else threshold
    if best and best[0] >= limit:
        score, name, example = best
        return Route(name, f"similar to example '{example}' ({score:.2f}){fallback}", score)
    return Route(BASE_ROLE, f"no rule matched and no example is similar enough{fallback}", best[0] if best else 0.0)


def keyword_frames(prompt: str, roles: list[Role]) -> tuple[list[tuple[Role, "request_frame.Hit"]], set[str]]:
    """For roles with examples: those whose keyword the prompt asks for ("in Spanish", "write a haiku"),
    each with its first framed hit, and the names of those whose keyword it only mentions ("Spanish
    history"): a mentioned subject is no evidence for the role, so meaning may not pick it either."""
    asked, mentioned = [], set()
    for role in roles:
        if not role.examples:
            continue
        words = frozenset(kw.lower() for kw in role.keywords if kw.isalpha())
        found = [h for kw in role_keywords(role) for h in request_frame.hits(prompt, kw, words - {kw.lower()})]
        framed = [h for h in found if h.framed]
        if framed:
            asked.append((role, framed[0]))
        elif found:
            mentioned.add(role.name)
    return asked, mentioned


def role_keywords(role: Role) -> list[str]:
    """Longest first, so 'sign off' is tried before 'sign'; ties alphabetical, so the reason names
    the same keyword in every run (a set's order changes with PYTHONHASHSEED)."""
    return sorted({*role.keywords}, key=lambda kw: (-len(kw), kw))


def _asked_for(prompt: str, roles: list[Role], asked) -> Route:
    """One role asked for: it. Several ("in Spanish, as a table"): the one the prompt is most like."""
    if len(asked) == 1:
        role, hit = asked[0]
        return Route(role.name, f"keyword '{hit.keyword}' asked for: {hit.framed}")
    scored = []
    for role, hit in asked:
        m = most_similar_meaning(prompt, roles, only=role.name)
        scored.append((m.score if m else -1.0, role.name, hit))
    score, name, hit = max(scored, key=lambda t: t[0])
    others = ", ".join(n for _, n, _ in scored if n != name)
    return Route(name, f"keyword '{hit.keyword}' asked for: {hit.framed} (also asked: {others}; "
                       f"{name} is nearest by meaning, {score:.2f})", max(score, 0.0))


def _by_meaning(prompt: str, roles: list[Role], threshold: float, skip: set[str] = frozenset(),
                mentioned: set[str] = frozenset()) -> Route:
    best = most_similar_meaning(prompt, roles, skip=skip)
    if best is None and any(map(plain_question, pieces(prompt))):
        return Route(BASE_ROLE, "reads as a plain question about its subject: it asks for no manner", 0.0)
    if best is None:
        return Route(BASE_ROLE, "no rule matched, and no words to compare or no role has examples", 0.0)
    piece = best.piece if len(best.piece) <= 80 else best.piece[:77] + "..."
    if best.role in mentioned:  # the subject named is no evidence; another role's manner may be asked for
        other = most_similar_meaning(prompt, roles, skip=set(skip) | set(mentioned))
        if other is not None and other.score >= _threshold_for(other.role, roles, threshold) \
                and manner_score(prompt, roles, other.role)[0] >= MENTIONED_NEXT_MANNER:
            return _by_meaning(prompt, roles, threshold, skip=set(skip) | set(mentioned))
    logit = asks_logit(prompt, roles, best.role) if _few_examples(best.role, roles) else None
    if logit is not None and logit >= ASKS_SURE and best.score >= 0:  # its own classifier reads a clear request
        return Route(best.role, f"'{piece}' reads as a request for {best.role}'s manner (its classifier: {logit:+.2f}; "
                                f"{best.score:.2f} above plain requests)", best.score)
    threshold = _threshold_for(best.role, roles, threshold)
    if best.score < threshold:
        return Route(BASE_ROLE, f"reads as a plain request: nearest style is {best.role} for '{piece}' "
                                f"({best.score:.2f} < {threshold:.2f} above plain requests)", best.score)
    manner = manner_score(prompt, roles, best.role)[0]
    if manner < MEANING_MANNER_GATE and best.role in mentioned:  # like the role because it names its subject
        return Route(BASE_ROLE, f"nearest style is {best.role} for '{piece}', but the prompt only mentions its "
                                f"subject and does not ask for its manner ({manner:+.2f})", best.score)
    if manner < MEANING_MANNER_GATE and not request_frame.shapes_the_answer(best.piece):  # like its subject, not its manner
        return Route(BASE_ROLE, f"'{piece}' is like {best.role}'s examples ({best.score:.2f} above plain requests) but "
                                f"nearer to plain requests or questions about its subject ({manner:+.2f})", best.score)
    if logit is not None and logit < ASKS_LOGIT:
        return Route(BASE_ROLE, f"'{piece}' is like {best.role}'s examples ({best.score:.2f} above plain requests) "
                                f"but its classifier reads no request for its manner ({logit:+.2f})", best.score)
    return Route(best.role, f"'{piece}' is similar to {best.role}'s example '{best.example}' "
                            f"({best.similarity:.2f}; {best.score:.2f} above plain requests)", best.score)


# Fitted on the development sets (tests/routing/dev*.toml), as SEMANTIC_THRESHOLD on dev.toml.
MEANING_MANNER_GATE = -0.05  # manner_score a meaning route needs
MENTIONED_NEXT_MANNER = 0.4  # 0.15-0.6 tie; below, plain prompts go to roles
# A role with few examples (users write 3-5) has a noisier centroid: it must stand out more, and its own
# classifier must agree (on every role the classifier costs bundled asks on dev.toml).
FEW_EXAMPLES = 5
FEW_EXAMPLES_THRESHOLD = 0.24  # 0.22-0.26 tie on the dev sets: the middle
ASKS_LOGIT = -0.5  # -1.0: fewer neutral prompts caught; 0.0: asks lost on the bundled dev sets
ASKS_SURE = 2.5  # a logit that routes on its own (2.0-2.5 tie on the dev sets; 3.0 helps fewer asks)


def _few_examples(name: str, roles: list[Role]) -> bool:
    role = next((r for r in roles if r.name == name), None)
    return role is not None and len(role.examples) <= FEW_EXAMPLES


def _threshold_for(name: str, roles: list[Role], threshold: float) -> float:
    return max(threshold, FEW_EXAMPLES_THRESHOLD) if _few_examples(name, roles) else threshold


def manner_score(prompt: str, roles: list[Role], name: str) -> tuple[float, str, str]:
    """(score, piece, example): how much nearer the prompt's best piece is to one of role ``name``'s
    examples than to the nearest plain request or plain question about the role's keywords."""
    from edgelora.routing.embedder import embed_many

    space = _space(roles)
    ps = pieces(prompt)
    if space is None or not ps or name not in space.manner:
        return -1.0, "", ""
    q = embed_many(ps)
    labels, pos, neg = space.manner[name]
    near = q @ pos.T
    score = near.max(1) - (q @ neg.T).max(1)
    i = int(np.argmax(score))
    return float(score[i]), ps[i], labels[int(np.argmax(near[i]))]


def _has_keyword(prompt: str, kw: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(kw.lower())}(?![a-z0-9])", prompt.lower()) is not None


_CLAUSE = re.compile(r"[:;,.!?]|\b(?:then|and then)\b")
# a style request often rides inside a sentence: "Explain photosynthesis | in | buccaneer speak"
_LINK = re.compile(r"\b(?:and|then|like|as if|as though|in|with|the way|using)\b", re.IGNORECASE)
MAX_PIECES = 16


def clauses(prompt: str) -> list[str]:
    """The prompt and its clauses: an instruction ("One line only") and a topic ("what does a CPU
    do?") often share one sentence, and the instruction is what picks a role."""
    parts = [c.strip() for c in _CLAUSE.split(prompt) if c and c.strip()]
    return list(dict.fromkeys([*parts, prompt.strip()]))


def pieces(prompt: str) -> list[str]:
    """What is compared with the roles: the clauses, and each clause cut at linking words (parts of
    two words or more). A long prompt (a pasted document) keeps its first and last pieces, where
    instructions are."""
    out = clauses(prompt)
    for clause in list(out):
        if plain_question(clause):  # "What is the tallest building | in | the world?": a question's tail asks for no manner
            continue
        parts = [p.strip() for p in _LINK.split(clause) if p and len(p.split()) >= 2]
        if len(parts) > 1:
            out += parts
    out = [p for p in dict.fromkeys(out) if _WORD.search(p.lower())]  # "?" alone says nothing
    return out if len(out) <= MAX_PIECES else out[: MAX_PIECES // 2] + out[-MAX_PIECES // 2:]


# "how would you explain …", "what would a pirate say …", "how can you …"; not "how can I …"
_PUT_TO_YOU = re.compile(r"\b(?:would|wouldst)\b|\b(?:could|can|will|wilt)\s+(?:you|u|ye|thou)\b")
_ASKS_YOU = re.compile(r"\b(?:could|can|will|would)\s+(?:you|u)\b|\byou\s+(?:could|would)\b")  # "is there a way you could …", "… could you?"


def plain_question(piece: str) -> bool:
    """A piece that opens as a question about the subject ("how do I end an email?", "why do people
    say one-liners are hard?"): it asks for no manner, however like a role's examples its subject is.
    Not one put to the assistant ("how would you explain …", "what would a pirate say …", "is there
    any chance you could …"), a suggestion ("how about …") nor an imperative "do" ("do a live …")."""
    words = _WORD.findall(piece.lower())
    if not words or words[0] not in request_frame.QUESTION:
        return False
    if words[0] == "do" and words[1:2] and words[1] in {"a", "an", "the", "your", "me", "us", "it", "this", "that"}:
        return False
    if words[1:2] == ["about"]:  # "how about a haiku?", "what about in French?": a suggestion
        return False
    return not (_PUT_TO_YOU.search(" ".join(words[:4])) or _ASKS_YOU.search(" ".join(words)))


def _question_tails(prompt: str) -> set[str]:
    """The later clauses of a sentence that is a plain question ("how do I get better at writing short,
    | punchy emails?"): parts of the question, not requests of their own."""
    tails = set()
    for sentence in re.split(r"(?<=[.!?])\s+", prompt.strip()):
        parts = [c.strip() for c in _CLAUSE.split(sentence) if c and c.strip()]
        if len(parts) > 1 and sentence.endswith("?") and plain_question(parts[0]):
            tails.update(parts[1:])
    return tails


@dataclass(frozen=True)
class Match:
    score: float        # similarity to the role minus similarity to plain requests
    role: str
    piece: str          # the part of the prompt that matched
    example: str        # the role's closest example (for the reason)
    similarity: float   # the piece's cosine to that example


@dataclass
class _RoleSpace:
    """Role centroids in embedding space. Each role is the mean of its examples' *style* parts (for
    "Give me the answer as JSON: what is a cat?" the clause least like any plain request, "Give me
    the answer as JSON") and its description; `base` is the mean of plain requests (neutral_prompts.py);
    `manner` holds, per role, its examples and the plain requests plus plain questions *about* its
    keywords (neutral_prompts.about), for `manner_score`."""
    shared: np.ndarray
    base: np.ndarray
    centroids: dict[str, np.ndarray]
    examples: dict[str, tuple[list[str], np.ndarray]]
    manner: dict[str, tuple[list[str], np.ndarray, np.ndarray]]  # examples, their vectors, plain + about-keyword vectors
    asks: dict[str, np.ndarray]  # per role with few examples: its classifier's weights (_fit_asks)


_SPACES: dict[tuple, _RoleSpace] = {}


def _space(roles: list[Role]) -> _RoleSpace | None:
    from edgelora.routing.embedder import embed_many
    from edgelora.routing.neutral_prompts import NEUTRAL_PROMPTS, SMALL_TALK, about

    key = tuple((r.name, tuple(r.examples), r.description, tuple(r.keywords)) for r in roles)
    if key in _SPACES:
        return _SPACES[key]
    plain = embed_many(list(NEUTRAL_PROMPTS))
    texts = {}
    for r in roles:
        if r.examples:
            texts[r.name] = [_style_part(e, plain) for e in r.examples] + ([r.description] if r.description else [])
    if not texts:
        return None
    vectors = {n: embed_many(ts) for n, ts in texts.items()}
    shared = np.concatenate([plain, *vectors.values()]).mean(0)
    base = _unit(plain.mean(0) - shared)
    manner = {}
    for r in roles:
        if r.name in texts:
            labels = [*r.examples, *(_style_part(e, plain) for e in r.examples)]
            nouns = subject_keywords(r.keywords)
            subject = [plain, embed_many(list(SMALL_TALK))] + ([embed_many(about(nouns))] if nouns else [])
            manner[r.name] = (labels, embed_many(labels), np.concatenate(subject))
    space = _RoleSpace(shared, base, {n: _unit(v.mean(0) - shared) for n, v in vectors.items()},
                       {r.name: (list(r.examples), embed_many(list(r.examples))) for r in roles if r.name in texts},
                       manner, _fit_asks(roles, texts, plain))
    if len(_SPACES) > 8:
        _SPACES.clear()
    _SPACES[key] = space
    return space


_ANSWER_NOUNS = {"answer", "response", "reply", "sentence", "line", "word", "paragraph", "summary", "version", "output"}


def subject_keywords(keywords: list[str]) -> list[str]:
    """The keywords that can name a subject ("German", "regex", "pirate"), not those that can only name a
    manner: an adverb ("briefly"), a phrase opening with a preposition ("in short") or a request verb
    ("sign off"), a kind of answer ("short answer", "one sentence"), an abbreviation ("tl;dr"). Plain questions *about* a manner word ("What is briefly?")
    read like requests for that manner, so they would veto the role itself."""
    from edgelora.routing import request_frame

    def subject(kw: str) -> bool:
        words = kw.lower().split()
        return bool(words) and not (words[-1].endswith("ly") or words[0] in request_frame.PREP
                                    or words[0] in request_frame.SPEECH | request_frame.CREATE
                                    or words[-1].rstrip("s") in _ANSWER_NOUNS  # "short answer", "one sentence"
                                    or re.search(r"[^\w\s\-'\u00c0-\u024f]", kw))
    return [kw for kw in keywords if subject(kw)]


def _style_part(example: str, plain: np.ndarray) -> str:
    """The clause of an example whose closest plain request is farthest (the whole example if it has
    one clause). Chosen over "farthest from the plain requests' mean" and over cutting at linking
    words by accuracy on the development set."""
    from edgelora.routing.embedder import embed_many

    parts = [c for c in clauses(example) if c != example.strip()]
    if not parts:
        return example
    closeness = (embed_many(parts) @ plain.T).max(1)
    return parts[int(np.argmin(closeness))]


def most_similar_meaning(prompt: str, roles: list[Role], only: str | None = None,
                         skip: set[str] = frozenset(), questions: bool = False) -> Match | None:
    """The (piece of the prompt, role) pair that stands out most from a plain request (``only``:
    that role's best piece). Plain questions are left out unless ``questions`` (or ``only``)."""
    from edgelora.routing.embedder import embed_many

    space = _space(roles)
    every = ps = pieces(prompt)
    if only is None and not questions:  # a plain question carries no manner (on the dev sets no ask's best piece was one)
        tails = _question_tails(prompt)
        ps = [p for p in ps if not plain_question(p) and p not in tails]
    if space is None or not ps or (only is not None and only not in space.centroids):
        return None
    # All the pieces in one pass: manner_score and asks_logit, which usually follow, read the plain
    # questions too, and a second pass for them re-reads the weights (~10 ms for a 6-token question).
    embed_many(every)
    raw = embed_many(ps)
    q = raw - space.shared
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
    names = [only] if only is not None else [n for n in space.centroids if n not in skip]
    if not names:
        return None
    over_plain = q @ np.array([space.centroids[n] for n in names]).T - (q @ space.base)[:, None]
    i, j = np.unravel_index(int(np.argmax(over_plain)), over_plain.shape)
    examples, vectors = space.examples[names[j]]
    sims = vectors @ raw[i]
    k = int(np.argmax(sims))
    return Match(float(over_plain[i, j]), names[j], ps[i], examples[k], float(sims[k]))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def fit_threshold(labelled: list[tuple[str, str]], roles: list[Role]) -> float:
    """The threshold that routes the most of ``labelled`` (prompt, role) right; ties go to the
    higher threshold (fewer false routes away from base). Rule hits are left to the rules; the score
    is the raw one, on every piece, before the later checks (manner, classifier, plain questions)."""
    scored = []
    for prompt, want in labelled:
        if _rules(prompt, roles, keywords_of_roles_with_examples=False) is None:
            best = most_similar_meaning(prompt, roles, questions=True)
            if best is not None:
                scored.append((best.score, best.role, want))
    candidates = sorted({round(s, 2) for s, _, _ in scored} | {1.0})

    def right(t: float) -> int:
        return sum((name if s >= t else BASE_ROLE) == want for s, name, want in scored)

    return max(candidates, key=lambda t: (right(t), t))


def _rules(prompt: str, roles: list[Role], keywords_of_roles_with_examples: bool = True) -> Route | None:
    """An explicit mention, then the manifests' regex and keyword rules. With
    ``keywords_of_roles_with_examples`` off, a keyword decides only for a role without examples (a
    role with examples is judged by meaning: whether its manner is asked for)."""
    low = prompt.lower()
    names = {r.name.lower(): r.name for r in roles}
    mention = re.search(r"(?:^|\s)@([a-z0-9][a-z0-9_.-]*)", low) or re.search(r"\b(?:as|in) (?:the |a )?([a-z0-9_.-]+) role\b", low)
    if mention and mention.group(1) in names:
        return Route(names[mention.group(1)], f"explicit mention '{mention.group(0).strip()}'")
    if mention and mention.group(1) == BASE_ROLE:
        return Route(BASE_ROLE, f"explicit mention '{mention.group(0).strip()}'")

    hits: list[tuple[int, str, str]] = []
    for role in roles:
        for kw in role.keywords if keywords_of_roles_with_examples or not role.examples else ():
            if _has_keyword(prompt, kw):
                hits.append((len(kw), role.name, f"keyword '{kw}'"))
        for pattern in role.regex:
            if _regex_hit(pattern, prompt, role):
                hits.append((100, role.name, f"rule /{pattern}/"))
    if hits:
        _, name, reason = max(hits)  # a regex rule, then the longest keyword, wins
        return Route(name, reason)
    return None


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
        from edgelora.roles.manifest import RoleError

        raise RoleError(f"{role.path}: routing.regex {pattern!r} took over {REGEX_BUDGET_S * 1e3:.0f} ms on this "
                        "prompt (catastrophic backtracking?); simplify it") from None



ASKS_L2 = 0.1  # the classifier's ridge penalty (0.03 and 0.1 on the dev sets: mixed; the larger)
ASKS_JOINED = 4  # plain requests joined to each style part, as positives


def _fit_asks(roles: list[Role], texts: dict[str, list[str]], plain: np.ndarray) -> dict[str, np.ndarray]:
    """Per role with few examples: weights (embedding + bias) of a logistic regression "asks for this
    role's manner" vs "does not". Joining a style part to plain requests ("Answer in Italian: What is
    a volcano?") teaches that the request, not the topic, makes a positive; plain questions about the
    role's keywords ("Is Italian hard to learn?") that naming the subject makes none."""
    from edgelora.routing.embedder import embed_many
    from edgelora.routing.neutral_prompts import NEUTRAL_PROMPTS, about

    with_examples = [r for r in roles if r.name in texts]
    out = {}
    for k, r in enumerate(with_examples):
        if len(r.examples) > FEW_EXAMPLES:
            continue
        styles = list(dict.fromkeys(_style_part(e, plain) for e in r.examples))
        requests = [NEUTRAL_PROMPTS[(7 * k + ASKS_JOINED * i + j) % len(NEUTRAL_PROMPTS)]
                    for i in range(len(styles)) for j in range(ASKS_JOINED)]
        joined = [f"{q} {s}" if j % 2 else f"{s}: {q}"  # the style part after, then before, the request
                  for j, (s, q) in enumerate(zip((s for s in styles for _ in range(ASKS_JOINED)), requests))]
        positives = list(dict.fromkeys([*r.examples, *styles, *joined]))
        others = [e for o in with_examples if o.name != r.name for e in o.examples]
        negatives = list(dict.fromkeys([*NEUTRAL_PROMPTS, *about(subject_keywords(r.keywords)), *others]))
        y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
        out[r.name] = _logistic(embed_many(positives + negatives), y, ASKS_L2)
    return out


def _logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 30) -> np.ndarray:
    """Weights and bias of an L2-regularised logistic regression, both classes weighted equally (Newton's method)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    weight = np.where(y == 1, 0.5 / y.sum(), 0.5 / (1 - y).sum()) * len(y)
    ridge = l2 * np.eye(xb.shape[1])
    ridge[-1, -1] = 0.0  # the bias is not penalised
    w = np.zeros(xb.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-xb @ w))
        step = np.linalg.solve((xb * (weight * p * (1 - p))[:, None]).T @ xb + ridge, xb.T @ (weight * (p - y)) + ridge @ w)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w


def asks_logit(prompt: str, roles: list[Role], name: str) -> float:
    """The highest logit of role ``name``'s classifier over the prompt's pieces (+inf: the role has none)."""
    from edgelora.routing.embedder import embed_many

    space = _space(roles)
    ps = pieces(prompt)
    if space is None or not ps or name not in space.asks:
        return math.inf
    w = space.asks[name]
    return float((embed_many(ps) @ w[:-1] + w[-1]).max())
