"""Split text into sentences for synthesis, so the first one can be spoken while the rest wait.

A period ends a sentence unless the next word starts in lowercase or the period closes a title
("Dr.", "Mrs."), a Latin abbreviation ("e.g.", "vs."), an initial ("J. K. Rowling") or a numbering
word before its number ("No. 7", "p. 12"). Decimals ("3.5", "$9.99") have no space after the
point and never split. Sentences longer than `max_chars` are cut at clause punctuation, else between
words, so no single piece keeps the first audio waiting.
"""

from __future__ import annotations

import re

TITLES = frozenset(
    "mr mrs ms mx dr prof sr jr st mt gen col lt sgt capt cmdr gov sen rep rev hon pres supt insp".split()
)
LATIN = frozenset("eg ie cf vs viz al approx ca".split())
NUMBERING = frozenset("no nos vol vols ch sec fig figs p pp art para".split())
# Western stops need a space after them; the full-width ones of Chinese and Japanese text stand between words.
_END = re.compile(r"(?:\.\.\.|[.!?\u2026])+[\"\u201d\u2019')\]]*(?=\s)|[\u3002\uff01\uff1f]+[\u300d\u300f\uff09]*")
_CLAUSE = re.compile(r"(?<=[,;:—])\s+")
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")


def split(text: str, max_chars: int = 300, first_chars: int | None = None) -> list[str]:
    """Sentences of `text` in order, stripped, none empty, each at most `max_chars` long.

    With `first_chars`, a longer first sentence is cut at its last clause break (",", ";", ":",
    "—") within that many characters, so the first audio needs only that clause; without such a
    break it stays whole.
    """
    out: list[str] = []
    for paragraph in re.split(r"\s*\n\s*", text.strip()):
        for sentence in _sentences(paragraph):
            out.extend(_bounded(sentence, max_chars))
    out = [s for s in out if s]
    if first_chars and out and len(out[0]) > first_chars:
        out[:1] = _first_clause(out[0], first_chars)
    return out


def _first_clause(sentence: str, limit: int) -> list[str]:
    cuts = [m.start() for m in _CLAUSE.finditer(sentence) if m.start() <= limit]
    if not cuts:
        return [sentence]
    return [sentence[: cuts[-1]], sentence[cuts[-1] :].strip()]


def ends_sentence(text: str) -> bool:
    """Whether `text` ends where `split` would end a sentence (its last stop, then nothing but space)."""
    tail = text.rstrip() + " "  # a Western stop needs a space after it
    stops = [m.end() for m in _END.finditer(tail)]
    return bool(stops) and not tail[stops[-1] :].strip()


def _sentences(paragraph: str) -> list[str]:
    out: list[str] = []
    start = 0
    for match in _END.finditer(paragraph):
        if _ends_here(paragraph, match.start(), paragraph[match.end() :].lstrip()):
            out.append(paragraph[start : match.end()].strip())
            start = match.end()
    out.append(paragraph[start:].strip())
    return out


def _ends_here(text: str, punct: int, following: str) -> bool:
    if following[:1].islower():
        return False
    if text[punct] != "." or text.startswith("...", punct):
        return True
    word = _WORD_BEFORE.search(text[: punct + 1])
    if word is None:  # "in 2024. Then": a number, not an abbreviation
        return True
    dotted = word.group(1)
    token = dotted.lower().replace(".", "")
    if token in TITLES or token in LATIN:
        return False
    if token in NUMBERING:
        return not following[:1].isdigit()
    return not (len(dotted) == 1 and dotted.isupper())  # "J. K. Rowling"


def _bounded(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    pieces: list[str] = []
    current = ""
    for clause in _CLAUSE.split(sentence):
        for part in _within(clause, max_chars):
            if current and len(current) + 1 + len(part) > max_chars:
                pieces.append(current)
                current = part
            else:
                current = f"{current} {part}" if current else part
    if current:
        pieces.append(current)
    return pieces


def _within(clause: str, max_chars: int) -> list[str]:
    """`clause` cut between words into parts of at most `max_chars` (a longer single word stays whole)."""
    if len(clause) <= max_chars:
        return [clause]
    out: list[str] = []
    current = ""
    for word in clause.split():
        if current and len(current) + 1 + len(word) > max_chars:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        out.append(current)
    return out
