"""The loop spec (`ftservice validate` and `schema --kind loop` know it) and the statistics
its promotion decisions rest on."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

from pydantic import Field, field_validator

from ftservice.config import Problem, Spec, SpecError, read_yaml, validate_spec
from ftservice.data.judges import JUDGES
from ftservice.errors import FtserviceError
from ftservice.feedback.campaign import CampaignSpec, load_campaign, load_prompts
from ftservice.feedback.simulate import SimulateSpec

LOOP_KEYS = {"votes_per_round", "candidates", "held_out", "promotion"}
"""Top-level keys only a loop spec has: how `ftservice validate` tells the kinds apart."""


class LoopError(FtserviceError):
    pass


# ---- the spec --------------------------------------------------------------------------------


class SweepCandidates(Spec):
    sweep: str = Field(description="A finished sweep's folder (what `sweep report` reads).")
    top: int = Field(2, ge=1, description="Its best trials that start the loop.")


class PromotionSpec(Spec):
    alias: str = Field(
        "production", pattern=r"^[a-z0-9][a-z0-9._-]*$", description="The stable name on the API."
    )
    canary_share: float = Field(
        0.2, ge=0, le=1, description="Share of the alias's calls a new adapter takes at first."
    )
    min_votes: int = Field(
        20,
        ge=1,
        description="Head-to-head votes (new adapter vs its parent, on answers that differ) "
        "before a decision.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Of the win rate's interval (Wilson score)."
    )
    focus_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of a round's comparisons that pit the new adapter against its "
        "parent (the rest follow the campaign's pair policy over all competitors).",
    )
    max_domain_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Never promote an adapter whose held-out domain score is more than this "
        "below its parent's.",
    )
    max_empty_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Never promote an adapter with more empty held-out answers than this "
        "share (a preference rule can be won by saying nothing).",
    )


class LoopSpec(Spec):
    """A closed loop on a serving app."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=60, description="Loop name.")
    serve: str = Field(description="The serve spec of the app the loop runs on (required).")
    campaign: CampaignSpec = Field(
        description="The campaign of the rounds (a file or inline): its prompts are what "
        "people compare on; `models` is set by each round."
    )
    candidates: list[str] | SweepCandidates = Field(
        description="The starting adapters: registry names, or the top trials of a sweep."
    )
    include_base: bool = Field(False, description="The base model competes in the first round too.")
    dpo: str = Field(
        "cluster/jobs/loop-dpo.yaml",
        description="The DPO job spec template (stage: dpo); per round its data.train is the "
        "round's pairs, dpo.parent the round's leader, output.registry the app's first "
        "registry and name <loop>-r<round>.",
    )
    votes_per_round: int = Field(100, ge=2, description="Votes each round collects.")
    rounds: int = Field(1, ge=1, description="DPO rounds (each trains one new adapter).")
    closing_votes: int | None = Field(
        None,
        ge=0,
        description="Votes of the closing round that judges the last adapter (no training); "
        "unset: votes_per_round; 0: none.",
    )
    stop_when_not_promoted: bool = Field(
        False, description="Stop after a round whose new adapter was not promoted."
    )
    promotion: PromotionSpec = Field(default_factory=PromotionSpec, description="Promotion.")
    held_out: list[str] = Field(
        min_length=1,
        description="Prompt files for the final judgement of each new adapter against its "
        "parent; never shown in a round.",
    )
    held_out_limit: int | None = Field(40, ge=1, description="Held-out prompts used; unset: all.")
    judge: str | None = Field(
        "answer_key",
        description="How the held-out answers are judged (win rate): answer_key (the answer "
        "that states the reference fact wins; both right: the plain, shorter one; both wrong: "
        "a tie), or preference (the length rule alone, the old judge); null: none (the domain "
        "score and the empty-answer check still apply).",
    )
    simulate: SimulateSpec | None = Field(
        None, description="Simulated annotators vote each round (demos, tests); unset: people."
    )
    output_dir: str = Field("state/loops", description="Where rounds' files and loop.json go.")

    @field_validator("campaign", mode="before")
    @classmethod
    def _read_campaign_file(cls, value):
        if isinstance(value, str):
            try:
                return load_campaign(value).model_dump()
            except SpecError as e:
                raise ValueError(str(e)) from None
        return value


def _prompt_texts(files: list[str]) -> dict[str, str]:
    spec = CampaignSpec(name="held-out", prompts=files)
    return {json.dumps(m, sort_keys=True): pid for pid, m in load_prompts(spec)}


def loop_problems(spec: LoopSpec) -> list[Problem]:
    problems = []
    for field, path in [("serve", spec.serve), ("dpo", spec.dpo), *[
            (f"held_out.{i}", p) for i, p in enumerate(spec.held_out)]]:  # fmt: skip
        if not Path(path).is_file():
            problems.append(Problem(field, f"no file '{path}'"))
    if problems:
        return problems
    if not spec.campaign.prompts:
        problems.append(Problem("campaign.prompts", "a loop's campaign needs prompt files"))
    else:
        shared = set(_prompt_texts(spec.held_out)) & set(_prompt_texts(spec.campaign.prompts))
        if shared:
            problems.append(
                Problem(
                    "held_out",
                    f"{len(shared)} held-out prompt(s) are also campaign prompts; held-out "
                    "prompts must never be shown in a round: use another file",
                )
            )
    if spec.judge is not None and spec.judge not in JUDGES:
        problems.append(Problem("judge", f"judge '{spec.judge}': one of {', '.join(JUDGES)}"))
    if spec.promotion.min_votes > spec.votes_per_round:
        problems.append(
            Problem(
                "promotion.min_votes",
                f"{spec.promotion.min_votes} head-to-head votes cannot come from a round of "
                f"{spec.votes_per_round}; lower it or raise votes_per_round",
            )
        )
    if isinstance(spec.candidates, list) and not spec.candidates:
        problems.append(Problem("candidates", "name at least one adapter"))
    alone = isinstance(spec.candidates, list) and len(spec.candidates) < 2
    if alone and not spec.include_base and not spec.campaign.self_pairs:
        problems.append(
            Problem(
                "candidates",
                "a round compares two models at least, or a model with itself: name two "
                "adapters, set include_base: true, or set campaign.self_pairs above 0",
            )
        )
    return problems


def is_loop_spec(data: dict) -> bool:
    return bool(LOOP_KEYS & set(data))


def load_loop(path: str | os.PathLike, overrides: list[str] | None = None) -> LoopSpec:
    """Read a YAML loop spec; SpecError lists every problem with its line."""
    data, lines = read_yaml(path, "loop")
    if isinstance(data.get("campaign"), str) and any(
        o.strip().startswith("campaign.") for o in overrides or []
    ):  # `campaign.name=x` changes the campaign the file names, not replaces it
        with contextlib.suppress(SpecError):  # the field's own check reports a bad file
            data["campaign"] = load_campaign(data["campaign"]).model_dump()
    return validate_spec(LoopSpec, data, str(path), lines, overrides, loop_problems)


# ---- statistics --------------------------------------------------------------------------------


def wilson(wins: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a win rate (ties counted as half a win)."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def head_to_head(votes: list[dict], challenger: str, parent: str, confidence: float) -> dict:
    """The challenger's win rate over its parent in the votes that compared exactly them
    (ties and 'both bad' count half). A vote between two answers of the same text says
    nothing about which model is better (both models gave it, from the same seed): it is
    counted apart (`same_answer`), as in neither the wins nor the votes."""
    wins, n, same = 0.0, 0, 0
    for v in votes:
        if {v["model_a"], v["model_b"]} != {challenger, parent}:
            continue
        if v.get("response_a") is not None and v.get("response_a") == v.get("response_b"):
            same += 1
            continue
        n += 1
        if v["verdict"] in ("tie", "both_bad"):
            wins += 0.5
        elif (v["model_a"] if v["verdict"] == "a" else v["model_b"]) == challenger:
            wins += 1
    lo, hi = wilson(wins, n, confidence)
    return {"votes": n, "wins": wins, "winrate": wins / n if n else None, "interval": [lo, hi],
            "same_answer": same}  # fmt: skip


def decide(h2h: dict, held_out: dict, promotion: PromotionSpec) -> tuple[str, list[str]]:
    """promote, rollback, inconclusive or refused (won, but held out it fails), with why."""
    lo, hi = h2h["interval"]
    reasons = []
    enough = h2h["votes"] >= promotion.min_votes
    if not enough:
        reasons.append(f"{h2h['votes']} head-to-head votes, fewer than {promotion.min_votes}")
    blocked = []
    drop = held_out.get("domain_drop")
    if drop is not None and drop > promotion.max_domain_drop:
        blocked.append(
            f"held-out domain score {drop:.1%} below its parent's (margin "
            f"{promotion.max_domain_drop:.1%})"
        )
    empty = held_out.get("empty_share")
    if empty is not None and empty > promotion.max_empty_share:
        blocked.append(f"{empty:.0%} of its held-out answers are empty")
    if enough and lo > 0.5:
        if blocked:
            return "refused", [f"win rate lower bound {lo:.2f} > 0.5, but", *blocked]
        return "promote", [f"win rate lower bound {lo:.2f} > 0.5 over {h2h['votes']} votes"]
    if enough and hi < 0.5:
        return "rollback", [f"win rate upper bound {hi:.2f} < 0.5 over {h2h['votes']} votes"]
    if enough:
        reasons.append(f"interval [{lo:.2f}, {hi:.2f}] holds 0.5")
    return "inconclusive", reasons + blocked
