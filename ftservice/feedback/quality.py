"""Which annotators count: gold accuracy, agreement with the others, too-fast and one-sided
voting, and the votes that are left once the unreliable are out.

- Gold comparisons (`votes.issue` makes them in the campaign's gold share) know their better
  side; an annotator's gold accuracy is the share they got right.
- On a comparison item several annotators judged, each other annotator's verdict is a check,
  passed when the two agree in the item's own terms (which model won, tie, both bad), not
  left or right.
- Reliability: the share of an annotator's checks they passed, where a check against
  another annotator weighs by how far that annotator's own reliability is above chance
  (0.25, a random voter over the four verdicts; gold checks weigh 1), found by iterating
  from equal weights (a weighted majority in the manner of Dawid and Skene): a
  careful annotator who shares items with a spammer is not dragged down by their
  disagreement, and two spammers agreeing by chance do not vouch for each other. Below
  `min_reliability` with at least `min_checks` checks, the annotator's votes do not count
  (quality control on). A hand-written better answer is exported only
  from an annotator who has the checks and passes them, whether quality control is on or
  off: it is trained on verbatim.
- Flags, for the admin to look at: more than `max_fast_share` of votes sent within
  `min_vote_seconds` of their comparison being issued; the same side picked in more than
  `max_side_share` of decided votes.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from ftservice.feedback.campaign import QualitySpec
from ftservice.feedback.leaderboard import vote_label

ITERATIONS = 20
"""Rounds of re-weighting the checks by the checkers' reliability (it settles in a few)."""
CHANCE = 0.25
"""How often a random voter over the four verdicts agrees with a given one."""


@dataclass
class AnnotatorQuality:
    annotator: str
    votes: int = 0
    gold: int = 0
    gold_right: int = 0
    shared: int = 0
    agreed: int = 0
    reliability: float | None = None
    """Share of checks passed; None with fewer than min_checks."""
    too_fast: int = 0
    left: int = 0
    decided: int = 0
    median_s_per_vote: float = 0.0
    flags: list[str] = field(default_factory=list)
    counts: bool = True
    """Their votes count (quality control off, too few checks, or reliable)."""
    trusted: bool = False
    """Their hand-written better answers are exported (enough checks, reliable)."""

    def row(self) -> dict:
        return asdict(self)


@dataclass
class CountedVotes:
    votes: list[dict]
    """The votes of two models that count, better answers of untrusted annotators removed."""
    annotators: dict[str, AnnotatorQuality]
    dropped: dict[str, int]
    """gold_votes, unreliable_votes, unreliable_annotators, better_answers_untrusted."""


def _seconds(vote: dict) -> float:
    latency = vote["latency"] if isinstance(vote["latency"], dict) else json.loads(vote["latency"])
    return (latency.get("issue_to_vote_ms") or 0.0) / 1000


def assess(
    votes: list[dict], items: dict[str, str], spec: QualitySpec
) -> dict[str, AnnotatorQuality]:
    """Each annotator's quality from the campaign's votes that count (gold ones included;
    dicts as `votes.vote_json` makes them); `items`: comparison id -> item."""
    out: dict[str, AnnotatorQuality] = {}
    times: dict[str, list[float]] = defaultdict(list)
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for v in votes:
        q = out.setdefault(v["annotator"], AnnotatorQuality(v["annotator"]))
        q.votes += 1
        seconds = _seconds(v)
        times[v["annotator"]].append(seconds)
        q.too_fast += seconds < spec.min_vote_seconds
        if v["verdict"] in ("a", "b"):
            q.decided += 1
            q.left += v["verdict"] == "a"
        if v.get("gold"):
            q.gold += 1
            q.gold_right += v["verdict"] == v["gold"]
        else:
            by_item[items.get(v["comparison_id"], v["comparison_id"])][v["annotator"]] = vote_label(
                v
            )
    checks = [  # (annotator, other annotator, agreed) on each item both judged
        (who, other, label == theirs)
        for judged in by_item.values()
        for who, label in judged.items()
        for other, theirs in judged.items()
        if other != who
    ]
    for who, _, agreed in checks:
        out[who].shared += 1
        out[who].agreed += agreed
    reliability = dict.fromkeys(out, 1.0)
    for _ in range(ITERATIONS):
        # a checker weighs by how far above chance they agree: a random voter weighs nothing
        weight = {n: max(0.0, (r - CHANCE) / (1 - CHANCE)) for n, r in reliability.items()}
        passed = {name: float(q.gold_right) for name, q in out.items()}
        total = {name: float(q.gold) for name, q in out.items()}
        for who, other, agreed in checks:
            total[who] += weight[other]
            passed[who] += weight[other] * agreed
        reliability = {n: passed[n] / total[n] if total[n] else reliability[n] for n in out}
    for name, q in out.items():
        q.median_s_per_vote = round(float(np.median(times[name])), 1)
        if q.gold + q.shared >= spec.min_checks:
            q.reliability = round(reliability[name], 3)
        passes = q.reliability is not None and q.reliability >= spec.min_reliability
        q.trusted = passes
        q.counts = not spec.enabled or q.reliability is None or passes
        if q.reliability is not None and not passes:
            q.flags.append(f"reliability {q.reliability:.2f} < {spec.min_reliability:.2f}")
        if q.votes and q.too_fast / q.votes > spec.max_fast_share:
            q.flags.append(f"{q.too_fast} of {q.votes} votes within {spec.min_vote_seconds:g} s")
        if q.decided >= spec.min_checks:
            side = max(q.left, q.decided - q.left) / q.decided
            if side > spec.max_side_share:
                where = "left" if q.left * 2 > q.decided else "right"
                q.flags.append(f"picked the {where} answer in {side:.0%} of decided votes")
    return out


def counted_votes(
    votes: list[dict],
    items: dict[str, str],
    spec: QualitySpec,
    quality: dict[str, AnnotatorQuality] | None = None,
) -> CountedVotes:
    """The votes that rate models and become preference pairs: no gold comparison; with
    quality control on, none of an unreliable annotator; a better answer only from a
    trusted annotator. `quality`: the annotators' quality, when it was assessed on more
    votes than these (a campaign's, for one round's)."""
    quality = quality if quality is not None else assess(votes, items, spec)
    kept, dropped = [], Counter()
    for v in votes:
        q = quality[v["annotator"]]
        if v.get("gold"):
            dropped["gold_votes"] += 1
        elif not q.counts:
            dropped["unreliable_votes"] += 1
        else:
            if v.get("better_answer") and not q.trusted:
                dropped["better_answers_untrusted"] += 1
                v = v | {"better_answer": None}
            kept.append(v)
    voters = {v["annotator"] for v in votes}
    dropped["unreliable_annotators"] = sum(not quality[a].counts for a in voters)
    return CountedVotes(kept, quality, dict(dropped))
