"""What an ordinary request looks like: the `base` side of `--role auto`.

The router compares a prompt with each role's examples *and* with these, so a plain question
("What is X?", "Explain Y.") stays on the base model even when a style role's examples are
phrased as questions too. Written for the router; disjoint from tests/routing/*.toml.
"""

NEUTRAL_PROMPTS = (
    "What is a volcano?",
    "How does the internet work?",
    "Explain how a car engine works.",
    "Tell me about the Roman Empire.",
    "Why is the sky dark at night?",
    "Who wrote Pride and Prejudice?",
    "How is weather different from climate?",
    "How do I bake bread at home?",
    "Write a short poem about autumn leaves.",
    "Give me some ideas for a birthday party.",
    "What are the symptoms of the flu?",
    "How many continents are there?",
    "Describe the life cycle of a butterfly.",
    "Can you help me plan a trip to Japan?",
    "What is photosynthesis?",
    "How do I fix a leaking faucet?",
    "Why do we dream?",
    "What is the square root of 144?",
    "Suggest a name for my new puppy.",
    "How does a solar panel make electricity?",
    "What happened during the industrial revolution?",
    "Explain what a blockchain is.",
    "Write a story about a dragon and a knight.",
    "What should I cook for dinner tonight?",
    "How do bees make honey?",
    "Compare cats and dogs as pets.",
    "What is gravity?",
    "How do I start running as a beginner?",
    "Translate 'good morning' into Spanish.",
    "What is the largest desert in the world?",
    "Help me write a cover letter for a teaching job.",
    "How do earthquakes happen?",
)


# Small talk: a greeting or thanks asks for no manner ("hey, how's your day?" is not a request to be
# terse). Only the manner check compares with these; they stay out of the plain-request direction.
SMALL_TALK = (
    "Hi!",
    "Hello there.",
    "Good morning!",
    "Hey, how are you?",
    "Thanks, that helps.",
    "Great, thank you!",
)


# Plain questions *about* a subject: a role's keywords name its subject as well as its manner
# ("Spanish", "SQL"), and a prompt that only mentions the subject is not asking for the manner.
ABOUT_TEMPLATES = (
    "What is {}?",
    "Tell me about the history of {}.",
    "How do I get better at {}?",
    "Why is {} so popular?",
    "What are the basics of {}?",
    "Is {} hard to learn?",
    "Recommend a good book about {}.",
    "What are common mistakes with {}?",
)


def about(keywords: list[str]) -> list[str]:
    return [t.format(kw) for kw in keywords for t in ABOUT_TEMPLATES]
