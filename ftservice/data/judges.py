"""How a pair of answers is judged, by a person who knows the domain or by the loop's judge.

- The answer key: an answer is right when the normalised reference fact appears in the
  normalised answer (the domain score's own match, `evaluate.domain_score`).
- The style rule (`preference_rule`): plain, no hedging, at most 25 words, then shorter.

A person comparing two answers to "What does the Brindlewood Lumen weigh?" prefers the one
with the right weight first, and the plain, short one second: `knows_answers` is that
preference (what the simulated annotators approximate, with their noise); `held_out` is the
loop's judgement of it on questions never voted on, without noise, bias or spam.
"""

from __future__ import annotations

import re

from ftservice.data import preference_rule

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise_answer(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def answer_matches(generated: str, reference: str) -> bool:
    return f" {normalise_answer(reference)} " in f" {normalise_answer(generated)} "


def style_verdict(a: str, b: str, tie_words: int = 0) -> str:
    """a, b or tie by the style rule: the answer that qualifies (plain, short, no hedging)
    wins; otherwise the shorter, a tie within `tie_words` words (or the same text)."""
    qa, qb = preference_rule.qualifies(a), preference_rule.qualifies(b)
    if qa != qb:
        return "a" if qa else "b"
    la, lb = len(a.split()), len(b.split())
    if normalise_answer(a) == normalise_answer(b) or abs(la - lb) <= tie_words:
        return "tie"
    return "a" if la < lb else "b"


def knows_answers(a: str, b: str, reference: str | None, tie_words: int = 1) -> str:
    """A person who knows the answer key: the answer that states the reference fact wins;
    both wrong is 'both_bad'; both right, or no reference, the style rule decides (a tie
    when the two are equivalent)."""
    if reference:
        ra, rb = answer_matches(a, reference), answer_matches(b, reference)
        if ra != rb:
            return "a" if ra else "b"
        if not ra:
            return "both_bad"
    return style_verdict(a, b, tie_words)


def length_rule(a: str, b: str, reference: str | None = None) -> str:
    """The shipped preference rule alone (the loop's first annotators): it never looks at
    whether an answer is right."""
    return "ab"[preference_rule.prefers(a, b)]


SCORES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


def held_out(a: str, b: str, reference: str | None) -> float:
    """The loop's judgement of answer a against b: 1 a wins, 0 b wins, 0.5 a tie. The answer
    key first (a tie where both are right or both wrong), then the style rule only between
    two right answers (or where there is no reference): what `knows_answers` prefers, without
    a tie margin."""
    return SCORES[knows_answers(a, b, reference, tie_words=0)]


def held_out_length_rule(a: str, b: str, reference: str | None = None) -> float:
    """The old judgement: the length rule that also cast the votes (a tie for equal texts)."""
    return 0.5 if a == b else 1.0 - preference_rule.prefers(a, b)


JUDGES = {"answer_key": held_out, "preference": held_out_length_rule}
"""The loop's held-out judges by name: (challenger's answer, parent's, reference) -> score."""
