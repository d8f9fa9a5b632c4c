"""The near-opposite check: two prompts that embed close together but ask different things.

A bi-encoder scores "turn on dark mode" and "turn off dark mode" above 0.95 cosine, as
close as a real paraphrase, so no threshold separates them. Before a semantic hit is
served, the stored prompt and the new one must agree on what such embeddings blur:

- **negation**: as many negations (not, n't, never, no, without, ...) on each side;
- **antonyms**: neither side holds a word whose antonym (``semantic_words.ANTONYMS``) is
  in the other and not in itself; the same for a prefix negation (safe / unsafe,
  legal / illegal, able / unable);
- **numbers**: the same numbers (digits and number words, as a multiset; in the same
  order when the prompt does arithmetic) and the same arithmetic operators;
- **named entities**: every capitalised word (not a sentence's first word, unless it is
  not a common word), acronym or mixed-case token of one side appears, in any case, in
  the other.

It is a veto only: it never turns a miss into a hit. Cost: a few regular expressions over
two short texts, tens of microseconds.
"""

from __future__ import annotations

import re

from kvroute.router.cache.semantic_words import (
    ANTONYM_OF,
    COMMON_WORDS,
    CONTRAST_WORDS,
    NEGATION_PREFIXES,
    NEGATIONS,
    NUMBER_WORDS,
)

_WORD = re.compile(r"[A-Za-z]+|\d+(?:[.,]\d+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CONTRACTED_NOT = re.compile(r"n['’]t\b", re.IGNORECASE)
_OPERATOR = re.compile(r"[+×÷*/^=<>−]|(?<=\s)-(?=\s)")
_SENTENCE_BREAK = re.compile(r"[.?!:;]\s+\S|\n")


def conflict(a: str, b: str) -> str | None:
    """Why ``a`` and ``b`` must not share an answer (``negation``, ``antonym``, ``number``,
    ``entity``), or None when the check finds no difference."""
    la, lb = [w.lower() for w in _WORD.findall(a)], [w.lower() for w in _WORD.findall(b)]
    if _negations(a, la) != _negations(b, lb):
        return "negation"
    if _antonym_swap(set(la), set(lb)):
        return "antonym"
    # Order counts in one sentence ("from Paris to Rome", "23 - 17"); across sentences a
    # reworded prompt may well state its facts in another order.
    ordered = _one_sentence(a) and _one_sentence(b)
    if _numbers(a, la, ordered) != _numbers(b, lb, ordered):
        return "number"
    ea, eb = _entities(a), _entities(b)
    if not set(ea) <= set(lb) or not set(eb) <= set(la):
        return "entity"
    names = set(ea) | set(eb)
    if ordered and _order(names, la) != _order(names, lb):
        return "entity"
    return None


def _one_sentence(text: str) -> bool:
    return _SENTENCE_BREAK.search(text.strip()) is None


def _order(names: set[str], words: list[str]) -> list[str]:
    """Names and contrast-set words (Celsius, minutes) in the order they first appear."""
    return list(dict.fromkeys(w for w in words if w in names or w in CONTRAST_WORDS))


def _negations(text: str, words: list[str]) -> int:
    return sum(1 for w in words if w in NEGATIONS) + len(_CONTRACTED_NOT.findall(text))


def _antonym_swap(sa: set[str], sb: set[str]) -> bool:
    for x, y in ((sa, sb), (sb, sa)):
        for w in x - y:
            if any(other in y and other not in x for other in ANTONYM_OF.get(w, ())):
                return True
            # "unsafe" on one side, "safe" on the other (and not both forms on either)
            if any(w.startswith(p) and w[len(p):] in y - x for p in NEGATION_PREFIXES):
                return True
    return False


def _numbers(text: str, words: list[str], ordered: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    values = [_plain(n) for n in _NUMBER.findall(text)] + [NUMBER_WORDS[w] for w in words if w in NUMBER_WORDS]
    operators = tuple(sorted(_OPERATOR.findall(text))) if values else ()
    # "17 - 23" is not "23 - 17": with arithmetic, the order of the numbers counts too
    return (tuple(values) if operators and ordered else tuple(sorted(values))), operators


def _plain(number: str) -> str:
    """1,000 and 1000 are one number; 3.50 and 3.5 too."""
    number = number.replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def _entities(text: str) -> list[str]:
    """Capitalised, all-caps or mixed-case words, lower-cased, in order; a sentence's first
    word only when it is not a common word ("What", "Explain")."""
    out: dict[str, None] = {}
    letters = [c for c in text if c.isalpha()]
    if sum(c.isupper() for c in letters) > 0.5 * len(letters):
        return []  # SHOUTED text: its capitals say nothing about names
    first = True
    for token in text.split():
        for i, word in enumerate(re.findall(r"[A-Za-z]+", token)):
            lower = word.lower()
            if (any(c.isupper() for c in word) and lower != "i"
                    and not (first and i == 0 and lower in COMMON_WORDS)):
                out[lower] = None
        first = token[-1] in ".?!:;"
    return list(out)
