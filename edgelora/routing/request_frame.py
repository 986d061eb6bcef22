"""Is a role's keyword *asked for*, or only *mentioned*? ("answer in Spanish" vs "Spanish history")

A keyword names a manner (a language, a format, a voice, an audience) but often a subject too. What
tells the two apart is the frame of the request around it, which is English grammar, not anything
about one role, so these rules hold for any user's keywords:

- a manner preposition after a request verb: "explain X *in* Spanish", "reply *as* JSON", "describe
  it *to a* toddler", "tell me *using* emojis", "*in the voice of* Yoda";
- a request for a thing of that kind: "*write me a* limerick", "*I need a* regex", "*give a* formal
  reply", "*what* regex matches…", "*Regex for* dates" at the start of the prompt;
- the keyword as a request of its own: "*Briefly*, …", "*Bullet points*: …", "*Yoda-style*, …",
  "… *then sign off*", "*Ahoy*!", or as its verb: "*Tweet it*: …", "*Diagram this*";
- a voice or size: "the way Yoda would", "how would Yoda explain…", "a *tweet-sized* take".

Not a frame: a question about the subject ("what is a regex?", "how do I make French toast?"),
"about/of X", a keyword that modifies a noun in a plain question ("German shepherd"). Plurals and
"one-liner"/"one liner" count as the keyword.

A request that speaks of the assistant's own answer ("a serialized object containing *your answer*",
"make *your reply* machine-readable") is shaping that answer: what it is like is the manner asked for,
even in words near the subject of a role (a format role's words are its subject too).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# verbs that ask the assistant to say something in some manner: they take a manner phrase, not the keyword as object
SPEECH = set("answer answering reply respond explain tell say describe talk speak summarize summarise list put "
             "translate show format rewrite turn write give make respond sing narrate present teach phrase "
             "word express break lay cover go walk introduce outline keep limit stick convert draw visualize visualise "
             "organize organise structure pitch".split())
# verbs whose object is the thing asked for ("write a limerick", "need a regex", "use emojis")
CREATE = set("write give make draft compose create produce output emit return send generate provide need want "
             "use put add include build craft prepare type sketch do end finish close conclude sign wrap start begin needs wants spit "
             "show tell".split())
MANNER_NOUN = {"voice", "style", "words", "manner", "tone", "way", "language", "form", "spirit", "persona"}
ROLE_PLAY = re.compile(r"\b(?:pretend|role-?play|act like|act as|imagine you|you're|you are|you were (?:a|an))\b"
                       r"|^(?:please )?be (?:a|an|like)\b")  # "as if you were a …", "Be a …"
PREP = {"in", "into", "as", "like", "using", "with", "to", "for", "via", "en", "auf"}
REQUEST_VERBS = (SPEECH | CREATE) - {"do", "end", "start", "begin", "close"}
# words that may sit between a preposition or verb and the keyword: "in *a few* bullet points", "as *a short* poem"
FILLER = set("a an the some few lots of plenty loads tons many several short simple plain proper valid nice quick back out "
             "very really super extra master captain sir lord lady dr mr mrs ms professor "
             "little small good single my our your his her their this that one two three four five clear "
             "polite proper full real strict nothing but only pure".split())
OBJECT = {"me", "us", "it", "this", "that", "them", "him", "her", "everything", "something", "answer", "response", "reply",
          "result", "output", "text", "explanation"}
# after the keyword: still a request for the manner ("Yoda-style", "Emoji answer please", "sign off at the end")
AFTER_OK = set("please pls only style speak form format voice mode version answer answers reply response terms "
               "language way output at the end too again now instead throughout all through whole thing max maximum most tops "
               "or less afterwards afterward later below underneath when you're you are done finished".split())
WH = {"what", "how", "why", "who", "when", "where", "which"}
LEAD = {"and", "then", "but", "please", "just", "so", "now", "ok", "okay", "also", "oh", "hey", "hi", "well", "bitte"}
QUESTION = {"how", "what", "why", "when", "where", "who", "whom", "whose", "which", "is", "are", "was", "were",
            "do", "does", "did", "should", "shall", "has", "have", "am",
            "what's", "how's", "who's", "where's", "when's", "why's"}
YOU = {"can", "could", "would", "will", "wo"}  # "can you …": a request, not a question about the subject
NOUN_REQUEST = {"about", "on", "of", "for", "to", "that", "which", "explaining", "describing", "showing"}
NOT_ADJECTIVE = QUESTION | NOUN_REQUEST | PREP | {"who", "and", "or", "but", "is", "are"}
_BOUND = re.compile(r"[:;,.!?()\[\]\"“”]|\s[-–—]\s|\b(?:then)\b")
_WORD = r"[a-z0-9'\u00c0-\u024f]+"
_WORDS = re.compile(rf"{_WORD}(?:-{_WORD})*")  # "five-line" is one word


_YOUR_ANSWER = re.compile(r"\byour (?:answer|reply|response|output)s?\b")


def shapes_the_answer(piece: str) -> bool:
    """Does this piece speak of the assistant's answer itself ("put your reply in a table")?"""
    return _YOUR_ANSWER.search(piece.lower()) is not None


@dataclass(frozen=True)
class Hit:
    keyword: str
    framed: str | None  # the frame that asks for it ("in Spanish"), None for a bare mention


@functools.lru_cache(maxsize=1024)  # built per keyword on every prompt otherwise
def keyword_pattern(keyword: str) -> re.Pattern:
    """The keyword as whole words, any spacing or hyphen between its words, singular or plural."""
    words = [re.escape(w) for w in re.split(r"[\s\-]+", keyword.lower().strip()) if w]
    if not words:
        return re.compile(r"(?!x)x")
    last = words[-1]
    if last.endswith("s") and len(last) > 3:
        words[-1] = last[:-1] + "(?:s|es)?"
    elif last[-1:].isalnum():
        words[-1] = last + "(?:s|es)?"
    if len(words) == 1 and len(last) <= 4 and last[-1:].isalpha():  # a drawn-out interjection: "arrr", "ahoyyy"
        words[-1] = words[-1].replace(last, last + re.escape(last[-1]) + "*", 1)
    return re.compile(r"(?<![\w])" + r"[\s\-]+".join(words) + r"(?![\w])")


def hits(prompt: str, keyword: str, companions: frozenset[str] = frozenset()) -> list[Hit]:
    """``companions``: the role's other one-word keywords, which may stand beside this one in a frame
    of their own ("Ahoy matey, …")."""
    low = prompt.lower()
    return [Hit(keyword, frame(low, m.start(), m.end(), companions)) for m in keyword_pattern(keyword).finditer(low)]


def _clause_words(text: str, before: bool) -> list[str]:
    parts = _BOUND.split(text)
    return _WORDS.findall(parts[-1] if before else parts[0])


def frame(low: str, start: int, end: int, companions: frozenset[str] = frozenset()) -> str | None:
    """The request frame around ``low[start:end]`` (a keyword found in the lowercased prompt), or None."""
    kw = low[start:end]
    before, after = _clause_words(low[:start], True), _clause_words(low[end:], False)
    ends_clause = bool(re.match(r"\s*(?:[:;,.!?)]|\s[-–—]\s|$)", low[end:]))
    # the keyword is the request: "Briefly, …", "Bullet points: …", "… then sign off", "Yoda-style"
    lead = [w for w in before if w not in LEAD and w not in companions]
    if not lead and " " in kw and kw.split()[0] in REQUEST_VERBS | {"end", "close"}:
        return f"'{kw}' opens its clause"  # a verb-phrase keyword as an imperative: "… and sign it from me"
    if not set(lead) - {"the", "a", "an"} and (not after or all(w in AFTER_OK or w in companions for w in after)):
        return f"'{kw}' on its own"
    if len(lead) == 1 and not _BOUND.search(low[:start]) and after and after[0] in {"please", "pls"} \
            and all(w in AFTER_OK for w in after):
        return f"'{lead[0]} {kw} {after[0]}'"  # "Numbered steps please: …"
    if kw.endswith("ly") and after and after[0] in SPEECH and _addressed(lead):
        return f"'{kw} {after[0]}'"  # an adverb before the request verb: "Briefly explain …", "can you briefly describe"
    if kw.endswith("ly") and before[-1:] == ["as"] and after[:1] == ["as"]:
        return f"'as {kw} as …'"  # an adverb of manner compared: "as briefly as you can", "as simply as possible"
    voice = after[0].lstrip("-") if after else ""
    if re.match(r"-?(?:voiced|styled?|speak|talk|flavou?red|themed|accent|impression|lingo|slang|voice|tone|mode|sized|length)$", voice) \
            and (_addressed(lead) or _is_request(lead, low[:start])):
        return f"'{kw} {voice}'"  # a voice asked for: "do your best pirate impression", "a pirate-voiced answer"
    if not lead and after[:1] and after[0] in {"it", "this", "them"}:
        return f"'{kw} {after[0]}'"  # the keyword as the request's verb: "Tweet it: …", "Diagram this"
    first_clause = not _BOUND.search(low[:start])
    if not lead and first_clause and after and after[0] in WH:
        return f"'{kw} {after[0]} …' at the start"  # "tl;dr what is physics?"
    if not lead and first_clause and after and after[0] in NOUN_REQUEST and not ends_clause:
        return f"'{kw} {after[0]} …' at the start"  # "Regex for dates", "Limerick about cats"
    if not before and re.search(r",\s*$", low[:start]):  # "a polite, formal reply": one list of adjectives
        before = _clause_words(low[:start].rstrip()[:-1], True)
    words = before
    if after[:1] and after[0] in {"would", "could", "can", "will", "might"} and set(words) & (MANNER_NOUN | {"terms"}):
        return f"'… {' '.join(words[-2:])} {kw} {after[0]} …'"  # "in words a little kid would get"
    if ROLE_PLAY.search(" ".join(words)):
        return f"'{' '.join(words)} {kw}'"  # "act like you're aboard a pirate ship"
    of = max((k for k in range(max(1, len(words) - 4), len(words)) if words[k] == "of"), default=None)
    if of is not None and words[of - 1] in MANNER_NOUN and (of == len(words) - 1 or words[of + 1] in {"a", "an", "the"}):
        return f"'{' '.join(words[of - 3:])} {kw}'"  # "in the voice of Yoda", "in the voice of an old pirate"
    if words and words[-1] in {"and", "then"} and (ends_clause or all(w in AFTER_OK for w in after)):
        return f"'{words[-1]} {kw}'"  # "… and sign off", but not "cats and German shepherds"
    i = _skip_fillers(words)
    prev = words[i - 1] if i else ""
    if prev == "would" and after and after[0] in SPEECH:
        return f"'would {' '.join(words[i:])} {kw} {after[0]}'"  # "what would a pirate say about …"
    if prev in {"speak", "talk"} and i == len(words) and _addressed(words[:i - 1]):
        return f"'{prev} {kw}'"  # the keyword as the language spoken: "Speak pirate to me"
    head = words[:i - 1]
    if prev in PREP and _is_request(head, low[:start]):
        return f"'{' '.join(words[i - 1:])} {kw}'"
    if kw.endswith("ly") and prev in SPEECH and all(w in FILLER for w in words[i:]):  # "answer (very) briefly"
        return f"'{prev} … {kw}'"
    j = i - 1
    if j >= 0 and prev in OBJECT and not (prev in CREATE and _addressed(words[:j])):  # "make the response valid JSON", "give me a formal reply"
        j = _skip_fillers(words[:j]) - 1
    verb = words[j] if j >= 0 else ""
    if verb in CREATE and _addressed(words[:j]) and not (verb == "do" and j == len(words) - 1):  # "Do flashcards work?"
        return f"'{' '.join(words[j:])} {kw}'"
    if verb in {"get", "have"} and re.fullmatch(r"(?:\w+ )*?(?:can|could|may) (?:i|we)", " ".join(words[:j])):
        return f"'{' '.join(words[j - 2:])} {kw}'"  # "can I get a JSON response"
    if kw.endswith("ly") and verb in SPEECH and all(w in FILLER for w in words[i:]):  # an adverb: "tell me (very) briefly"
        return f"'{verb} … {kw}'"
    if words and words[-1] == "would" and after and after[0] in SPEECH:
        return f"'would {kw} {after[0]}'"
    if after[:1] == ["would"] and prev in {"way", "as", "like", "how"}:
        return f"'{prev} {kw} would'"  # "as (Master) Yoda would"
    if lead and lead[0] in {"what", "which"} and len(lead) <= 2 and lead[-1] in {"what", "which", "a", "an", "the"} \
            and after and after[0] not in {"is", "are", "was", "were", "does", "do", "did", "s", "means", "mean"}:
        return f"'{lead[0]} {kw} …'"  # asks for one: "what regex matches …"
    return None


def _skip_fillers(words: list[str]) -> int:
    """Index just after the preposition or verb before the keyword: skips fillers ("in a few bullet
    points") and up to two adjectives after "a"/"an" ("a funny five-line limerick")."""
    i = len(words)
    while i and words[i - 1] in FILLER:
        i -= 1
    for gap in (1, 2):
        gap_words = words[i - gap:i]
        if i - gap > 0 and words[i - gap - 1] in {"a", "an"} and not set(gap_words) & NOT_ADJECTIVE:
            j = i - gap - 1
            while j and words[j - 1] in FILLER:
                j -= 1
            if j and (words[j - 1] in PREP or words[j - 1] in CREATE or words[j - 1] in OBJECT):
                return j
    return i


def _addressed(words: list[str]) -> bool:
    """The clause before a verb is a request to the assistant ("please write", "can you write", "I need"),
    not a question about doing it oneself ("how do I make …")."""
    core = [w for w in words if w not in LEAD]
    if not core:
        return True
    if core[0] in YOU and "you" in core:
        return True
    if core[0] == "do" and core[1:2] and core[1] in {"your", "a", "an", "me", "us", "it"}:
        return True  # "do your best …", "do me a …": an imperative, not a question
    return core[0] not in QUESTION and core[0] not in YOU and "to" not in core[-1:]


def _is_request(head: list[str], text_before: str) -> bool:
    """A manner preposition counts after a request verb in the prompt so far ("explain X to a toddler",
    "… , but in German"), when it opens its clause ("In bash, how do I …"), or after one word that is
    not a question ("Réponds en français", "Antworte auf Deutsch")."""
    core = [w for w in head if w not in LEAD]
    if not core or (len(core) == 1 and core[0] not in QUESTION and core[0] not in YOU):
        return True
    if re.match(r"(?:can|could|may) (?:i|we) (?:have|get)\b", " ".join(core)):  # "can I have that as JSON?"
        return True
    return any(w in REQUEST_VERBS for w in _WORDS.findall(text_before))

