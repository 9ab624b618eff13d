"""The written preference rule of the shipped preference seeds, as code a simulated annotator runs.

Rule: prefer the answer that states its fact plainly, in at most 25 words, without hedging
("I think", "maybe", "possibly", "not sure", "I believe", "it might"). When both or neither
qualify, prefer the shorter one.
"""

from __future__ import annotations

import re

HEDGES = ("i think", "maybe", "possibly", "not sure", "i believe", "it might", "perhaps")
MAX_WORDS = 25


def qualifies(answer: str) -> bool:
    text = answer.lower()
    return len(re.findall(r"\S+", answer)) <= MAX_WORDS and not any(h in text for h in HEDGES)


def prefers(a: str, b: str) -> int:
    """0 if the annotator prefers `a`, 1 if `b`."""
    qa, qb = qualifies(a), qualifies(b)
    if qa != qb:
        return 0 if qa else 1
    return 0 if len(a.split()) <= len(b.split()) else 1
