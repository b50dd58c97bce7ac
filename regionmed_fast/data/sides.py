"""Side words: what a horizontal flip changes in a text.

A flipped image shows the patient's left on the other side, so the image text and every region
text of a flipped sample get their side words swapped. The rule: each word of
:data:`SIDE_PAIRS` (either direction) is replaced by its partner when it stands as a whole word
(letters or digits on neither side; hyphens and punctuation are boundaries, so "left-sided"
becomes "right-sided"), case kept (``left`` -> ``right``, ``Left`` -> ``Right``, ``LEFT`` ->
``RIGHT``). Labels are not changed (they name classes). Single letters ("L", "R") are not
swapped: they too often mean something else (vertebra "L1" is one word, but "grade R" is not).
"""
from __future__ import annotations

import re

#: Swapped pairs (lower case; either member is replaced by the other).
SIDE_PAIRS = (
    ("left", "right"),
    ("leftward", "rightward"),
    ("leftwards", "rightwards"),
    ("leftmost", "rightmost"),
    ("lefthand", "righthand"),
    ("lt", "rt"),
    ("sinistral", "dextral"),
)

_PARTNER = {a: b for a, b in SIDE_PAIRS} | {b: a for a, b in SIDE_PAIRS}
_WORD = re.compile(r"(?<![0-9A-Za-z])(" + "|".join(sorted(_PARTNER, key=len, reverse=True))
                   + r")(?![0-9A-Za-z])", re.IGNORECASE)


def _case_like(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def swap_sides(text: str) -> str:
    """``text`` with every side word swapped for its partner (see the module docstring)."""
    return _WORD.sub(lambda m: _case_like(_PARTNER[m.group(1).lower()], m.group(1)), text)
