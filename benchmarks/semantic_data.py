"""Data for measuring the semantic cache: distinct questions, rule-based paraphrases, and
near-opposite pairs (benchmarks/data/semantic/README.md says where each comes from).

- ``questions()``: MMLU (the final question of each 5-shot prompt, with its choices) and
  GSM8K prompts from classifier/datasets/routellm, de-duplicated after normalisation, with
  RouteLLM's fixed split (``heldout`` vs the rest, which calibrates).
- ``paraphrase(text, rng)``: the same question reworded by 2-3 rules: casing, whitespace,
  punctuation, synonyms, a polite prefix, or reordered sentences/clauses. No rule changes
  a number, a negation, a named entity or an answer choice.
- ``near_opposite_pairs()``: pairs that must never share an answer (negation, antonym,
  number, entity), from hand-written seeds expanded by templates and from GSM8K problems
  with one number changed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kvroute.router.cache.semantic import normalise


@dataclass(frozen=True)
class Question:
    text: str
    task: str  # mmlu | gsm8k
    split: str  # heldout | calibration


def questions() -> list[Question]:
    from kvroute.classifier.data import load_routellm, question_text

    seen: set[str] = set()
    out = []
    for r in load_routellm(("mmlu", "gsm8k")):
        text = question_text(r.prompt).strip() if r.task == "mmlu" else r.prompt.strip()
        key = normalise(text)
        if key in seen:  # the same question twice: one answer, not a pair of distinct questions
            continue
        seen.add(key)
        out.append(Question(text, r.task, "heldout" if r.split == "heldout" else "calibration"))
    return out


# -- paraphrases ---------------------------------------------------------------------------

SYNONYMS = {
    "find": "determine", "calculate": "compute", "buys": "purchases", "bought": "purchased", "buy": "purchase",
    "total": "overall", "each": "every", "gets": "receives", "begins": "starts", "quickly": "rapidly",
    "answer": "response", "about": "regarding", "help": "assist", "use": "utilize", "uses": "utilizes",
    "shows": "demonstrates", "show": "demonstrate", "makes": "creates", "need": "require", "needs": "requires",
    "wants": "wishes", "want": "wish", "also": "additionally", "given": "provided", "true": "correct",
    "statement": "claim", "choose": "select", "following": "below", "likely": "probable", "main": "primary",
    "important": "significant", "describes": "characterizes", "whole": "entire", "amount": "quantity",
}
_PREFIXES = ("Please answer: ", "Question: ", "Quick question: ", "Can you help with this? ", "I need help. ")


def _casing(text: str, rng: random.Random) -> str:
    return text.lower() if rng.random() < 0.7 else text.upper()


def _whitespace(text: str, rng: random.Random) -> str:
    return "  " + re.sub(r" ", lambda m: "  " if rng.random() < 0.3 else " ", text) + "\n"


def _punctuation(text: str, rng: random.Random) -> str:
    stem, choices = _split_choices(text)
    stem = stem.rstrip()
    stem = stem[:-1] if stem.endswith(("?", ".")) else stem + "?"
    return stem.replace(",", "") + choices


def _synonyms(text: str, rng: random.Random) -> str:
    stem, choices = _split_choices(text)

    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = SYNONYMS[word.lower()]
        return new.capitalize() if word[0].isupper() else new

    pattern = r"\b(" + "|".join(SYNONYMS) + r")\b"
    return re.sub(pattern, swap, stem, flags=re.IGNORECASE) + choices


def _prefix(text: str, rng: random.Random) -> str:
    return rng.choice(_PREFIXES) + text


def _reorder(text: str, rng: random.Random) -> str:
    """Swap two leading sentences (the question stays last), else two clauses of one."""
    stem, choices = _split_choices(text)
    sentences = re.split(r"(?<=[.!])\s+", stem.strip())
    if len(sentences) >= 3:
        sentences[0], sentences[1] = sentences[1], sentences[0]
        return " ".join(sentences) + choices
    clauses = stem.split(", ", 1)
    if len(clauses) == 2 and len(clauses[0]) > 10:
        first, rest = clauses
        end = rest[-1] if rest[-1] in "?." else ""
        rest = rest.rstrip("?.")
        return f"{rest[0].upper()}{rest[1:]}, {first[0].lower()}{first[1:]}{end}" + choices
    return text


RULES = {"casing": _casing, "whitespace": _whitespace, "punctuation": _punctuation, "synonyms": _synonyms,
         "prefix": _prefix, "reorder": _reorder}


def paraphrase(text: str, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """The question reworded by 2-3 rules (applied in a fixed order), and their names."""
    names = sorted(rng.sample(sorted(RULES), rng.choice((2, 3))), key=list(RULES).index)
    # Reordering and synonyms first, casing and spacing last: each rule sees ordinary text.
    order = ("reorder", "synonyms", "prefix", "punctuation", "casing", "whitespace")
    out = text
    for name in sorted(names, key=order.index):
        out = RULES[name](out, rng)
    return out, tuple(names)


def _split_choices(text: str) -> tuple[str, str]:
    """An MMLU question's stem and its answer choices (kept verbatim)."""
    m = re.search(r"\nA\. ", text)
    return (text[: m.start()], text[m.start():]) if m else (text, "")


# -- near-opposite pairs -------------------------------------------------------------------

_FEATURES = ["dark mode", "two-factor authentication", "auto-save", "notifications", "location services",
             "the firewall", "spell check", "Bluetooth", "caps lock", "airplane mode", "autocorrect",
             "the screen reader", "automatic updates", "cookies", "night light"]
_SUBJECTS = ["aspirin", "ibuprofen", "coffee during pregnancy", "this mushroom", "tap water in Lisbon",
             "a VPN on public wifi", "rm -rf on a mounted volume", "swimming after eating", "fasting for 3 days",
             "this extension", "melatonin for kids", "leaving a laptop charging overnight", "raw cookie dough",
             "using bleach with vinegar", "microwaving plastic containers"]
_COUNTRIES = ["France", "Spain", "Italy", "Germany", "Portugal", "Peru", "Chile", "Japan", "Kenya", "Canada",
              "Norway", "Egypt", "India", "Brazil", "Mexico", "Poland", "Greece", "Turkey", "Vietnam", "Ghana"]
_PEOPLE = ["Marie Curie", "Isaac Newton", "Ada Lovelace", "Alan Turing", "Nikola Tesla", "Charles Darwin",
           "Rosalind Franklin", "Albert Einstein", "Grace Hopper", "Galileo Galilei"]
_LANGUAGES = ["French", "Spanish", "German", "Italian", "Japanese", "Portuguese", "Dutch", "Korean"]
_ANTONYM_TEMPLATES = [
    ("How do I turn on {f}?", "How do I turn off {f}?"), ("How do I enable {f}?", "How do I disable {f}?"),
    ("Why would I want to enable {f}?", "Why would I want to disable {f}?"),
]
_SAFETY = [("Is {s} safe?", "Is {s} unsafe?"), ("Is {s} safe?", "Is {s} dangerous?"),
           ("Is {s} safe?", "Is {s} not safe?"), ("Should I worry about {s}?", "Should I not worry about {s}?"),
           ("What are the benefits of {s}?", "What are the risks of {s}?")]
_COMPARATIVE = [
    ("What is the largest planet in the solar system?", "What is the smallest planet in the solar system?"),
    ("Which ocean is the deepest?", "Which ocean is the shallowest?"),
    ("What is the longest river in Africa?", "What is the shortest river in Africa?"),
    ("How can I increase my credit score?", "How can I decrease my credit score?"),
    ("How do I raise the volume with the keyboard?", "How do I lower the volume with the keyboard?"),
    ("Sort the list in ascending order.", "Sort the list in descending order."),
    ("What are the advantages of remote work?", "What are the disadvantages of remote work?"),
    ("What happens before a solar eclipse?", "What happens after a solar eclipse?"),
    ("How do I upload a file to the shared drive?", "How do I download a file from the shared drive?"),
    ("How do I encrypt a zip file?", "How do I decrypt a zip file?"),
    ("How do I lock the screen on a Mac?", "How do I unlock the screen on a Mac?"),
    ("How do I install the printer driver?", "How do I uninstall the printer driver?"),
    ("What is the maximum dose of paracetamol per day?", "What is the minimum dose of paracetamol per day?"),
    ("Why is the sky blue?", "Why is the sky red?"),
    ("Convert 30 degrees Celsius to Fahrenheit.", "Convert 30 degrees Fahrenheit to Celsius."),
    ("How many minutes are in a day?", "How many seconds are in a day?"),
    ("How do I freeze the top row in a spreadsheet?", "How do I unfreeze the top row in a spreadsheet?"),
    ("Is it legal to record a phone call?", "Is it illegal to record a phone call?"),
    ("What foods raise blood pressure?", "What foods lower blood pressure?"),
    ("How do I connect to the VPN?", "How do I disconnect from the VPN?"),
]
_NEGATION = [("Why does my laptop charge?", "Why doesn't my laptop charge?"),
             ("Why can I log in?", "Why can't I log in?"),
             ("Which animals are mammals?", "Which animals are not mammals?"),
             ("Can I take ibuprofen with food?", "Can I take ibuprofen without food?"),
             ("Does the function return a value?", "Does the function never return a value?"),
             ("List the numbers that are prime.", "List the numbers that are not prime."),
             ("Is this statement true?", "Is this statement false?"),
             ("Should I use a semicolon here?", "Should I not use a semicolon here?")]


def near_opposite_pairs(gsm8k: list[str] | None = None, seed: int = 0) -> list[dict]:
    """Pairs ``{a, b, kind, source}`` that must never share an answer."""
    rng = random.Random(seed)
    pairs: list[dict] = []

    def add(a: str, b: str, kind: str, source: str) -> None:
        pairs.append({"a": a, "b": b, "kind": kind, "source": source})

    for f in _FEATURES:
        for a, b in _ANTONYM_TEMPLATES:
            add(a.format(f=f), b.format(f=f), "antonym", "template")
    for s in _SUBJECTS:
        for a, b in _SAFETY:
            add(a.format(s=s), b.format(s=s), "negation" if " not " in b else "antonym", "template")
    for a, b in _COMPARATIVE:
        add(a, b, "antonym", "seed")
    for a, b in _NEGATION:
        add(a, b, "negation", "seed")
    for _ in range(60):  # arithmetic: one operand off by one, or another operator
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        op, other = rng.sample(["+", "-", "×", "/"], 2)
        if rng.random() < 0.5:
            add(f"What is {x} {op} {y}?", f"What is {x} {op} {y + 1}?", "number", "template")
        else:
            add(f"What is {x} {op} {y}?", f"What is {x} {other} {y}?", "number", "template")
    for a, b in [("What is seventeen times three?", "What is seventeen times four?"),
                 ("Convert 5 miles to kilometers.", "Convert 6 miles to kilometers."),
                 ("What was the population of Paris in 1900?", "What was the population of Paris in 1950?"),
                 ("How much is 15% of 80?", "How much is 25% of 80?"),
                 ("What is 23 - 17?", "What is 17 - 23?")]:
        add(a, b, "number", "seed")
    for problem in (gsm8k or [])[:100]:  # a GSM8K problem with one number changed
        numbers = list(re.finditer(r"\b\d+\b", problem))
        if numbers:
            m = rng.choice(numbers)
            changed = problem[: m.start()] + str(int(m.group(0)) + rng.randint(1, 9)) + problem[m.end():]
            add(problem, changed, "number", "gsm8k")
    for i, c in enumerate(_COUNTRIES):
        d = _COUNTRIES[(i + 1) % len(_COUNTRIES)]
        add(f"What is the capital of {c}?", f"What is the capital of {d}?", "entity", "template")
        add(f"What is the population of {c}?", f"What is the population of {d}?", "entity", "template")
        add(f"What currency is used in {c}?", f"What currency is used in {d}?", "entity", "template")
    for i, p in enumerate(_PEOPLE):
        q = _PEOPLE[(i + 3) % len(_PEOPLE)]
        add(f"When was {p} born?", f"When was {q} born?", "entity", "template")
        add(f"What is {p} best known for?", f"What is {q} best known for?", "entity", "template")
    for i, lang in enumerate(_LANGUAGES):
        other = _LANGUAGES[(i + 1) % len(_LANGUAGES)]
        add(f"Translate 'good morning' into {lang}.", f"Translate 'good morning' into {other}.", "entity",
            "template")
    return pairs
