"""--role auto: explicit mention, keyword/regex rules, similarity to examples, else base.
Accuracy on labelled held-out prompts for the bundled roles (none of them is a manifest example)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgelora.config import Config
from edgelora.roles.manifest import Role, RoleCatalog, bundled_dir
from edgelora.routing.router import route

LABELLED = [
    ("Explain the tides like a pirate would.", "pirate"),
    ("Ahoy there, what do sailors eat at sea?", "pirate"),
    ("Use a pirate voice to describe a parrot.", "pirate"),
    ("Matey, why is the sky blue?", "pirate"),
    ("Respond the way a buccaneer talks about ships.", "pirate"),
    ("Return JSON describing a dog.", "json"),
    ("Give me a structured answer about volcanoes.", "json"),
    ("Output machine-readable data about Mars.", "json"),
    ("Answer in json: what is water?", "json"),
    ("Reply in a format my program can parse: what is coffee?", "json"),
    ("Briefly explain gravity.", "terse"),
    ("In one sentence, what is a cloud?", "terse"),
    ("tl;dr of photosynthesis?", "terse"),
    ("Short answer: what is bread made of?", "terse"),
    ("Keep it short please, what is a comet?", "terse"),
    ("Describe autumn and sign off at the end.", "signoff"),
    ("Write about cats, then add your signature.", "signoff"),
    ("Explain the moon and sign it.", "signoff"),
    ("Tell me about oranges and end with your sign-off line.", "signoff"),
    ("What is the capital of Italy?", "base"),
    ("How do magnets work?", "base"),
    ("Write a haiku about spring.", "base"),
    ("What is 12 times 7?", "base"),
    ("Describe a sunset over the mountains.", "base"),
    ("Recommend a good book for a rainy day.", "base"),
]


@pytest.fixture(scope="module")
def bundled_roles():
    catalog = RoleCatalog([bundled_dir()])
    assert {"pirate", "json", "terse", "signoff"} <= set(catalog.names())
    return catalog.roles()


def test_auto_routing_accuracy_on_heldout_prompts(bundled_roles, capsys):
    threshold = Config().route_threshold
    wrong = [(p, want, route(p, bundled_roles, threshold)) for p, want in LABELLED]
    wrong = [(p, want, r) for p, want, r in wrong if r.role != want]
    accuracy = 1 - len(wrong) / len(LABELLED)
    with capsys.disabled():
        print(f"\n[routing] accuracy {accuracy:.0%} on {len(LABELLED)} held-out prompts; misses: "
              + "; ".join(f"{p!r} -> {r.role} ({r.reason})" for p, _, r in wrong))
    assert accuracy >= 0.9


def test_every_route_has_a_reason(bundled_roles):
    r = route("@terse what is a lake?", bundled_roles)
    assert r.role == "terse" and "explicit mention" in r.reason
    r = route("answer as the pirate role: what is a lake?", bundled_roles)
    assert r.role == "pirate" and "explicit mention" in r.reason
    r = route("What is 12 times 7?", bundled_roles)
    assert r.role == "base" and r.reason


def test_the_reason_names_the_same_keyword_whatever_the_hash_seed():
    """'sign off' and 'sign-off' are both signoff keywords of one length: tried in a set's order, the
    reason named either, depending on PYTHONHASHSEED (seen on 21 of 1024 dev/held-out prompts)."""
    code = ("from edgelora.roles.manifest import RoleCatalog, bundled_dir; from edgelora.routing.router import route; "
            "print(route('Explain how a heat pump works, and add a sign-off at the end.', "
            "RoleCatalog([bundled_dir()]).roles()).reason)")
    reasons = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(8)}
    assert len(reasons) == 1 and "sign" in reasons.pop()


def test_regex_rules_win_over_keywords():
    roles = [Role("a", None, keywords=["weather"]), Role("b", None, regex=[r"\bforecast\b"])]
    assert route("weather forecast for today", roles).role == "b"
    assert route("the weather today", roles).role == "a"


def _roles_for_another_base(folder, adapter):
    """'sea' was made for a gemma3 base, 'pinned' for another llama GGUF, 'harbour' fits SmolLM2."""
    from ..conftest import write_role

    write_role(folder, "sea", adapter, base='architecture = "gemma3"', routing='keywords = ["ahoy"]')
    write_role(folder, "pinned", adapter, base=f'architecture = "llama"\nsha256 = "{"0" * 64}"',
               routing='keywords = ["matey"]')
    write_role(folder, "harbour", adapter, base='architecture = "llama"', routing='keywords = ["ship"]')
    return RoleCatalog([folder])


def test_auto_only_chooses_roles_made_for_the_loaded_base_and_says_which_it_skipped(clean_engine, smol_adapters,
                                                                                     tmp_path):
    from edgelora.roles.session import Roles

    roles = Roles(clean_engine, Config(), catalog=_roles_for_another_base(tmp_path / "roles", smol_adapters["a"]))
    chosen = roles.route("ahoy, what is a ship?")
    assert chosen.role == "harbour"
    assert "skipped 'sea'" in chosen.reason and "gemma3" in chosen.reason
    pinned = roles.route("matey, what is rum?")
    assert pinned.role == "base" and "skipped 'pinned'" in pinned.reason and "sha256" in pinned.reason
    roles.use("auto")  # the turn itself routes, applies and answers: no "made for a gemma3 base" error
    roles.chat([{"role": "user", "content": "ahoy, what is a ship?"}], max_tokens=2, temperature=0.0)
    assert roles.current.label == "harbour" and "skipped 'sea'" in roles.current.route.reason


def test_auto_with_force_may_choose_a_role_made_for_another_base(clean_engine, smol_adapters, tmp_path):
    from edgelora.roles.session import Roles

    roles = Roles(clean_engine, Config(), force=True,
                  catalog=_roles_for_another_base(tmp_path / "roles", smol_adapters["a"]))
    chosen = roles.route("ahoy, what is a ship?")
    assert chosen.role == "sea" and "skipped" not in chosen.reason


@pytest.mark.parametrize("prompt, keyword, asked", [
    ("Please answer in German: why is the sky blue?", "german", True),
    ("Antworte auf Deutsch: was ist ein Loch?", "deutsch", True),
    ("Could you tell me how a bicycle works, but in German?", "german", True),
    ("Write me a funny five-line limerick about Mondays.", "limerick", True),
    ("I need a regex to match phone numbers.", "regex", True),
    ("Bullet points please: how to prepare for an interview", "bullet points", True),
    ("Yoda-style, tell me about sleep.", "yoda", True),
    ("Answer in the voice of Yoda: why do birds sing?", "yoda", True),
    ("Explain to a toddler what a rainbow is.", "toddler", True),
    ("Describe a forest and sign off at the end.", "sign off", True),
    ("Draft a polite, formal reply declining the offer.", "formal", True),
    ("Tell me about German unification in 1871.", "german", False),
    ("How do I make French toast?", "french", False),
    ("What does the 'g' flag do in a regex?", "regex", False),
    ("What are good toys for a toddler?", "toddler", False),
    ("Who was the voice actor for Yoda?", "yoda", False),
    ("Are bullet points better than paragraphs in a CV?", "bullet points", False),
    ("Tell me about cats and German shepherds.", "german", False),
    ("Answer briefly: what is rust?", "briefly", True),
    ("Can you briefly describe a river?", "briefly", True),
    ("Tell me very briefly what an eclipse is.", "briefly", True),
    ("Keep it to one sentence: what is a star?", "one sentence", True),
    ("Just the short answer: what is a prime number?", "short answer", True),
    ("tl;dr what is physics?", "tl;dr", True),
    ("Be a pirate and tell me about rain.", "pirate", True),
    ("Answer as if you were a pirate: what is tea?", "pirate", True),
    ("What would a pirate say about the moon?", "pirate", True),
    ("Speak pirate to me: what is a star?", "pirate", True),
    ("Answer in the voice of an old pirate: what is thunder?", "pirate", True),
    ("Do your best pirate impression and tell me about the weather.", "pirate", True),
    ("I'd love a pirate-voiced explanation of gravity.", "pirate", True),
    ("Send back JSON: what is a river?", "json", True),
    ("Can I get a JSON response about bees?", "json", True),
    ("My API needs JSON back: what is a cloud?", "json", True),
    ("What is a moon? Sign off afterwards.", "sign off", True),
    ("Show me the SQL that finds the second highest salary", "sql", True),
    ("Numbered steps please: how do I reset my router?", "steps", True),
    ("Antwort bitte auf Deutsch: what is snow?", "deutsch", True),
    ("Describe the ocean as Master Yoda would.", "yoda", True),
    ("What is pirate slang?", "pirate", False),
    ("Tell me a joke about a toddler.", "toddler", False),
    ("How do I do a pirate accent?", "pirate", False),
    ("How would I parse JSON in Go?", "json", False),
    ("Tweet it: why is the sea salty?", "tweet", True),  # the keyword as the request's verb
    ("a tweet-sized take on the Roman empire", "tweet", True),
    ("Convert my notes on Rome into flashcards", "flashcards", True),
    ("Structure this as JSON: the planets", "json", True),
    ("How do I delete a tweet?", "tweet", False),
    ("Do flashcards help with learning?", "flashcards", False),  # "do" asks a question here
    ("How many people speak Portuguese in Brazil?", "portuguese", False),  # main: 'speak portuguese' framed
    ("What's a fun idea for a pirate-themed birthday?", "pirate", False),  # main: "what's" did not open a question
    ("what's the pirate slang for friend?", "pirate", False),
    ("Recap the causes of the Great Depression as briefly as possible.", "briefly", True),  # an adverb compared
    ("clarify how a loan works, as simply as you can", "simply", True),
    ("Why did Rome fall so quickly?", "quickly", False),
])
def test_a_keyword_counts_when_the_request_frames_it_not_when_it_names_the_subject(prompt, keyword, asked):
    from edgelora.routing import request_frame

    hits = request_frame.hits(prompt, keyword)
    assert hits, "the keyword (or its plural) is found"
    assert any(h.framed for h in hits) == asked, hits


GERMAN = Role("german", bundled_dir() / "german.toml", description="answers in German", keywords=["german", "deutsch"],
              examples=["Answer in German: how do plants grow?", "Bitte auf Deutsch: was ist ein Vulkan?",
                        "Can you explain the water cycle in German?", "Reply in German please, what is a good breakfast?"])


@pytest.mark.parametrize("prompt, want", [
    ("Please answer in German: why is the sky blue?", "german"),
    ("Tell me about German unification in 1871.", "base"),  # main: german (bare keyword rule)
    ("Is a German shepherd a good family dog?", "base"),
    ("In one sentence: is German hard to learn?", "terse"),  # a bundled manner about the user role's subject
    ("Answer like a pirate: what is German beer like?", "pirate"),
])
def test_a_users_role_is_chosen_for_the_manner_asked_for_not_for_the_subject_named(bundled_roles, prompt, want):
    r = route(prompt, [*bundled_roles, GERMAN])
    assert r.role == want, r.reason


def test_a_roles_other_keywords_may_stand_beside_the_one_asked_for(bundled_roles):
    """'Ahoy matey, …': two of the pirate role's keywords make a request of their own."""
    r = route("Ahoy matey, what time zone is London in?", bundled_roles)
    assert r.role == "pirate" and "asked for" in r.reason, r.reason


HAIKU = Role("haiku", bundled_dir() / "haiku.toml", description="answers as a haiku (5-7-5)", keywords=["haiku"],
             examples=["Write a haiku about the morning.", "Answer in haiku form: what is time?",
                       "Describe the city as a haiku.", "Give me a haiku explaining rain."])


@pytest.mark.parametrize("prompt, want", [
    ("Keep it short: what is a haiku?", "terse"),  # main: haiku (nearest by meaning: it names haiku)
    ("What is a haiku?", "base"),
    ("Explain gravity as a haiku.", "haiku"),
])
def test_another_roles_manner_asked_about_a_users_subject_picks_that_role(bundled_roles, prompt, want):
    r = route(prompt, [*bundled_roles, HAIKU])
    assert r.role == want, r.reason


@pytest.mark.parametrize("prompt, want", [
    ("explain how tides work the way a pirate captain would", "pirate"),
    ("recommend a weekend hike, then sign off like you would in a letter", "signoff"),
    ("what are the colours of the rainbow? format: json array", "json"),
    ("What is JSON used for?", "base"),  # the subject named, its manner not asked for
])
def test_a_mentioned_keywords_role_wins_when_the_prompt_is_clearly_like_its_examples(bundled_roles, prompt, want):
    """The frame rules miss these requests ('… the way a pirate captain would', '… then sign off like …'); the
    keyword alone is no evidence, but a prompt much nearer the role's examples than plain questions about its
    subject is (the manner gate). Before: all three went to base; main: by the bare keyword."""
    r = route(prompt, bundled_roles)
    assert r.role == want, r.reason


PROSCONS = Role("proscons", bundled_dir() / "proscons.toml", description="answers as a list of pros and cons",
                keywords=["pros and cons", "pros", "cons"],
                examples=["pros and cons of electric cars", "give me the pros and cons: should I learn piano?",
                          "list the upsides and downsides of working from home",
                          "what are the advantages and disadvantages of nuclear power?"])


@pytest.mark.parametrize("prompt, want", [
    ("What is a cost-benefit analysis?", "base"),  # before: proscons (like its examples by meaning)
    ("pros and cons pls: should I buy a house?", "proscons"),
    ("Explain gravity as a haiku.", "haiku"),
])
def test_a_role_with_few_examples_needs_its_own_classifier_to_read_a_request_for_its_manner(bundled_roles, prompt, want):
    r = route(prompt, [*bundled_roles, PROSCONS, HAIKU])
    assert r.role == want, r.reason


def test_the_classifier_is_fitted_for_the_roles_with_few_examples_and_reads_the_request_not_the_subject(bundled_roles):
    from edgelora.routing import router

    roles = [*bundled_roles, GERMAN]
    assert set(router._space(roles).asks) == {"german"}  # the bundled roles have 7-10 examples
    asks = [router.asks_logit(p, roles, "german") for p in ("Answer in German: what is a volcano?",
                                                            "Reply in German please: how do magnets work?")]
    subject = [router.asks_logit(p, roles, "german") for p in ("Is German hard to learn?", "What is a volcano?")]
    assert min(asks) > router.ASKS_LOGIT > max(subject), (asks, subject)


def test_logistic_regression_separates_what_it_was_fitted_on():
    import numpy as np

    from edgelora.routing.router import _logistic

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = (x[:, 0] - x[:, 2] > 0.3).astype(float)
    w = _logistic(x, y, l2=0.01)
    assert ((x @ w[:-1] + w[-1] > 0) == (y == 1)).mean() >= 0.95


def test_a_few_example_roles_sure_classifier_routes_a_request_the_manner_gate_would_miss():
    """'turn photosynthesis into q/a study cards' is nearer plain questions about flashcards than the
    role's examples (manner_score < 0), but its classifier is sure (>= ASKS_SURE). Before: base."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import measure

    roles, _ = measure.user_roles("dev_user_roles5.toml")
    r = route("turn photosynthesis into q/a study cards", roles)
    assert r.role == "flashcards" and "classifier" in r.reason, r.reason


@pytest.mark.parametrize("prompt, keyword, asked", [
    ("how do I boil an egg? and sign it from me", "sign it", True),  # before: only mentioned (then base)
    ("what's the best way to learn chess? sign it 'cheers'", "sign it", True),
    ("sign off at the end like a letter: what is a nurse?", "sign off", True),
    ("how do I sign it?", "sign it", False),  # a question about signing, not an imperative
    ("how should I sign off a formal letter?", "sign off", False),
    ("sign-off etiquette for emails", "sign off", False),  # the noun, not the verb phrase
])
def test_a_verb_phrase_keyword_that_opens_its_clause_is_a_request(prompt, keyword, asked):
    from edgelora.routing import request_frame

    hits = request_frame.hits(prompt, keyword)
    assert hits and any(h.framed for h in hits) == asked, hits


@pytest.mark.parametrize("prompt, keyword, found", [
    ("arrr matey, recommend me a good book", "arr", True),
    ("ahoyyy! what is a map?", "ahoy", True),
    ("what is an array?", "arr", False),
    ("what is an arrow?", "arr", False),
])
def test_a_drawn_out_interjection_counts_as_the_keyword(prompt, keyword, found):
    from edgelora.routing import request_frame

    assert bool(request_frame.hits(prompt, keyword)) == found


@pytest.mark.parametrize("prompt, want", [
    ("arrr matey, recommend me a good book", "pirate"),  # before: base (the mention veto); main: pirate
    ("how do I boil an egg? and sign it from me", "signoff"),  # before: base; main: signoff
    ("spit out a json blob describing a typical laptop's specs", "json"),  # before: base; main: json
    ("who was the most famous pirate in history?", "base"),  # main: pirate (the bare keyword)
])
def test_bundled_asks_main_routed_by_keyword_still_route_and_plain_mentions_stay_on_base(bundled_roles, prompt, want):
    r = route(prompt, bundled_roles)
    assert r.role == want, r.reason


@pytest.mark.parametrize("prompt", [
    "How do I politely end an email to my manager?",  # main: signoff
    "Why do people say one-liners are hard to read?",  # main: terse
    "What is the tallest mountain in the world?",  # main: terse (for 'the world?', cut at "in")
    "Is it rude to answer a text with one word?",  # main: terse
    "What is the plot of Moby Dick?",  # main: pirate
    "How did ships navigate before GPS?",  # main: pirate
    "How can I learn to write short, punchy emails?",  # the question's later clause ("punchy emails") too
])
def test_a_plain_question_about_a_subject_stays_on_base_however_like_a_roles_examples(bundled_roles, prompt):
    r = route(prompt, bundled_roles)
    assert r.role == "base" and "plain question" in r.reason, r.reason


@pytest.mark.parametrize("piece, plain", [
    ("how do I end an email to my boss", True),
    ("what's a mortgage", True),
    ("do flashcards work", True),
    ("how can I learn to write short emails", True),
    ("how can you say it like a sea captain", False),
    ("is there any chance you could say it like a sea captain", False),
    ("how about a version a sea captain would tell", False),
    ("how would you explain death to a small child", False),  # put to the assistant
    ("what would a pirate say about rain", False),
    ("do a live commentary of a snail race", False),  # an imperative "do"
    ("Keep it short", False),
])
def test_a_plain_question_is_told_from_a_request_put_to_the_assistant(piece, plain):
    from edgelora.routing.router import plain_question

    assert plain_question(piece) == plain


@pytest.mark.parametrize("prompt", ["hey, how's your week going?", "thanks, that was useful!",
                                    "hi there, could you help me out?"])
def test_small_talk_asks_for_no_manner(bundled_roles, prompt):
    """Main: terse, signoff, terse (the greeting alone stood out from plain requests)."""
    r = route(prompt, bundled_roles)
    assert r.role == "base", r.reason


@pytest.mark.parametrize("prompt, want", [
    ("my exam is friday, flashcards on the causes of world war one", "flashcards"),  # before: base (the mention bar)
    ("are flashcards good for learning languages?", "base"),  # a plain question: still base
])
def test_a_prompt_that_names_a_roles_keyword_unframed_may_still_ask_for_its_manner(prompt, want):
    """With plain questions left out, the stricter bar for a mentioned keyword (MENTIONED_MANNER) went."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import measure

    roles, _ = measure.user_roles("dev_user_roles5.toml")
    r = route(prompt, roles)
    assert r.role == want, r.reason


def test_the_bundled_development_sets_lose_no_ask_that_main_got():
    """Across dev.toml and dev_bundled2-4, the branch lost 8 bundled asks main routed right (by a bare keyword);
    the frame rules for verb-phrase keywords, drawn-out interjections and 'spit out' win 4 back. What is left is
    pinned here so no change loses more: dev_bundled3 51/60, dev_bundled4 76/93 (a rule that sent faint
    meaning routes to base, FAINT_MANNER, was dropped: it cost a bundled held-out ask; with it 53/60, 74/93).
    Leaving plain questions out of routing by meaning (issue 27, route5) raised them to 54/60, 81/93."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import measure

    roles = RoleCatalog([bundled_dir()]).roles()
    right = {name: measure.evaluate(roles, "meaning", measure.labelled(name))["accuracy"] for name in measure.DEV_SETS}
    assert right["dev_bundled3.toml"] >= 54 / 60 and right["dev_bundled4.toml"] >= 81 / 93, right
