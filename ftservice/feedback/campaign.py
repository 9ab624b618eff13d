"""A feedback campaign: which models compete, on which prompts, how pairs are chosen, how many
votes each prompt gets, how many annotators see each comparison, and each annotator's quota.
Typed like the other specs; a serve spec lists the campaigns its page runs."""

from __future__ import annotations

import fnmatch
import math
import os
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

from pydantic import Field

from ftservice.config import Problem, Spec, read_yaml, validate_spec
from ftservice.data.judges import answer_matches, normalise_answer
from ftservice.data.loaders import expand, iter_examples, iter_records, load_rows


class CampaignGeneration(Spec):
    max_tokens: int = Field(128, ge=1, description="New tokens of each answer.")
    temperature: float = Field(
        0.7,
        ge=0,
        le=2,
        description="Sampling temperature (both answers share the seed, but for a model's "
        "second sample in a self pair: the next seed).",
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")


class QualitySpec(Spec):
    """Quality control of the votes (what Label Studio Enterprise and Argilla sell): gold
    comparisons, each annotator's reliability, and who counts."""

    enabled: bool = Field(
        True,
        description="Issue gold comparisons and leave annotators below the reliability "
        "threshold out of the export, the leaderboard and the loop's decisions (off: every "
        "vote counts; the reliability is still measured on the votes there are).",
    )
    gold_share: float = Field(
        0.1,
        ge=0,
        le=0.5,
        description="Share of the comparisons issued that are gold: a prompt with a "
        "reference answer (an `answer` field in its record), that answer against a distractor (the "
        "answer of the most similar other record, which states another fact); shown as any "
        "comparison is, never marked.",
    )
    min_reliability: float = Field(
        0.45,
        ge=0,
        le=1,
        description="Annotators whose reliability (share of gold comparisons judged right and "
        "of shared comparisons judged as another annotator did) is below this do not count. "
        "People agree on 63% of votes where ties are allowed (MT-Bench's human experts), a "
        "random voter over the four verdicts on about 25%.",
    )
    min_checks: int = Field(
        5,
        ge=1,
        description="Gold and shared comparisons an annotator needs before the threshold "
        "applies (fewer: their votes count, their better answers do not).",
    )
    min_vote_seconds: float = Field(
        2.0,
        ge=0,
        description="A vote sent sooner than this after its comparison was issued is flagged "
        "too fast.",
    )
    max_fast_share: float = Field(
        0.5, ge=0, le=1, description="Flag an annotator with more too-fast votes than this."
    )
    max_side_share: float = Field(
        0.9,
        gt=0.5,
        le=1,
        description="Flag an annotator who picks the same side (left or right) in more than "
        "this share of their decided votes (at least min_checks of them).",
    )


class CampaignSpec(Spec):
    """One preference campaign on a serving app."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Campaign name (required).")
    models: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Models that compete: adapter names or globs, and the base's name ('*': "
        "every servable adapter and the base).",
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompt files (the prompts format: 'instruction', 'prompt', or 'messages' "
        "ending in a user turn; an answer in the record is ignored).",
    )
    allow_custom_prompts: bool = Field(
        False, description="Annotators may type a prompt of their own."
    )
    pairs: Literal["uniform", "adaptive"] = Field(
        "adaptive",
        description="uniform: every pair equally often; adaptive: toward pairs whose order is "
        "least certain (few votes, ratings close), as Chatbot Arena samples.",
    )
    self_pairs: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of new items that pit a model against itself: two samples of its "
        "answer (the comparison's seed and the next), so the votes rank the model's own "
        "answers (on-policy pairs, as RLHF collects its preference data) and the exported "
        "pairs teach it where it is unsure. Left out of the ratings; with one model every "
        "item is one. Needs sampling (generation.temperature > 0).",
    )
    votes_per_prompt: int = Field(
        3, ge=1, description="Comparisons (items) made of each prompt, each with its own pair."
    )
    overlap: int = Field(
        1, ge=1, description="Annotators who see the same comparison (for agreement)."
    )
    quota: int | None = Field(
        50,
        ge=1,
        description="Comparisons issued to an annotator in this campaign (voted on or not); "
        "unset: no cap.",
    )
    max_pending: int = Field(
        2,
        ge=1,
        le=100,
        description="Comparisons an annotator may hold without a vote; one more is refused "
        "(429) until they vote.",
    )
    reveal: bool = Field(
        True,
        description="Show the two models' names after a vote (as Chatbot Arena does); a "
        "correction sent after that is stored but never counts.",
    )
    quality: QualitySpec = Field(
        default_factory=QualitySpec, description="Gold comparisons and annotator reliability."
    )
    generation: CampaignGeneration = Field(
        default_factory=CampaignGeneration, description="How the answers are generated."
    )
    requests_per_minute: int = Field(
        120, ge=1, description="Per-annotator rate limit on the page's API (429 over)."
    )
    max_comment_chars: int = Field(
        2000, ge=1, description="Longest comment or hand-written answer (413 over)."
    )
    max_prompt_chars: int = Field(4000, ge=1, description="Longest typed prompt (413 over).")


def campaign_problems(spec: CampaignSpec) -> list[Problem]:
    problems = []
    if not spec.prompts and not spec.allow_custom_prompts:
        problems.append(
            Problem(
                "prompts",
                "the campaign has no prompts: list prompt files, or set "
                "allow_custom_prompts: true so annotators type their own",
            )
        )
    if spec.self_pairs > 0 and spec.generation.temperature == 0:
        problems.append(
            Problem(
                "self_pairs",
                f"{spec.self_pairs} of the items pit a model against itself, but greedy "
                "decoding (generation.temperature: 0) gives both sides the same answer: set a "
                "temperature above 0 (0.7 is usual) or self_pairs: 0",
            )
        )
    return problems


SECOND_SAMPLE = "#2"
"""A model compared with itself (`self_pairs`): its second answer is stored, voted on and
exported under its name with this suffix (model names cannot hold '#')."""


def answer_slots(model_a: str, model_b: str, swapped: bool) -> tuple[str, str]:
    """The answers a comparison shows on its left and right: the two models'; for a model
    against itself, its first and second samples, in the order the comparison's coin
    (`swapped`) put them."""
    if model_a != model_b:
        return model_a, model_b
    pair = (model_a, model_a + SECOND_SAMPLE)
    return (pair[1], pair[0]) if swapped else pair


CAMPAIGN_KEYS = {"votes_per_prompt", "overlap", "quota", "pairs", "allow_custom_prompts"}
"""Top-level keys only a campaign has: how `ftservice validate` tells the kinds apart."""


def is_campaign_spec(data: dict) -> bool:
    return bool(CAMPAIGN_KEYS & set(data))


def load_campaign(path: str | os.PathLike, overrides: list[str] | None = None) -> CampaignSpec:
    """Read a YAML campaign; SpecError lists every problem with its line."""
    data, lines = read_yaml(path, "campaign")
    return validate_spec(CampaignSpec, data, str(path), lines, overrides, campaign_problems)


def load_prompts(spec: CampaignSpec) -> list[tuple[str, list[dict]]]:
    """(prompt id, chat messages ending in a user turn) of every record of the prompt files."""
    out = []
    for row in load_rows(spec.prompts):
        messages = list(row["messages"])
        while messages and messages[-1]["role"] == "assistant":  # an answer is not the prompt
            messages.pop()
        if messages and messages[-1]["role"] == "user":
            out.append((row["id"], messages))
    return out


@dataclass(frozen=True)
class Reference:
    """What a prompt record says is right: the short fact (`answer`) and the whole answer."""

    answer: str
    output: str


def load_references(paths: list[str]) -> dict[str, Reference]:
    """prompt id -> its reference, for the records of the prompt files that carry an `answer`
    field and an answer (the domain files do)."""
    out = {}
    for path in expand(paths):
        for (_, record), (_, _, row) in zip(iter_records(path), iter_examples(path), strict=True):
            answer, messages = record.get("answer"), row["messages"]
            if isinstance(answer, str) and answer.strip() and messages[-1]["role"] == "assistant":
                out[row["id"]] = Reference(answer.strip(), messages[-1]["content"])
    return out


def distractors(references: dict[str, Reference]) -> dict[str, str]:
    """prompt id -> a wrong answer that looks right: the answer of the record whose answer
    shares the most words with this one's (the same attribute of another product: 'The
    Obrellis weighs 812 grams.' for the Quillfeather's weight), among those stating another
    fact."""
    words = {k: set(r.output.lower().split()) for k, r in references.items()}
    out = {}
    for k, ref in references.items():
        others = [
            (len(words[k] & words[o]) / len(words[k] | words[o]), o)
            for o, other in references.items()
            if normalise_answer(other.answer) != normalise_answer(ref.answer)
            and not answer_matches(other.output, ref.answer)
        ]
        if others:
            out[k] = references[max(others)[1]].output
    return out


def competitors(spec: CampaignSpec, servable: list[str]) -> list[str]:
    """The servable models (the base's name among them) that the campaign's patterns select."""
    return [m for m in servable if any(fnmatch.fnmatchcase(m, p) for p in spec.models)]


def choose_pair(
    models: list[str],
    policy: str,
    rng: random.Random,
    counts: dict[frozenset, int] | None = None,
    ratings: dict[str, float] | None = None,
) -> tuple[str, str]:
    """Two different models. Uniform: any pair equally likely. Adaptive: pair (i, j) weighted
    by p(1-p)/(n+1), where p is i's chance to beat j by the current ratings (0.5 without
    ratings) and n the pair's votes so far: close pairs with few votes come up most, and
    every pair keeps a chance (a floor of a tenth of the mean weight)."""
    if len(models) < 2:
        raise ValueError(f"a comparison needs two models; the campaign has {models or 'none'}")
    pairs = list(combinations(sorted(models), 2))
    if policy == "uniform":
        pair = rng.choice(pairs)
    else:
        counts, ratings = counts or {}, ratings or {}
        weights = []
        for i, j in pairs:
            gap = (ratings.get(i, 1000.0) - ratings.get(j, 1000.0)) / 400
            p = 1 / (1 + math.pow(10, -gap))
            weights.append(p * (1 - p) / (counts.get(frozenset((i, j)), 0) + 1))
        floor = 0.1 * sum(weights) / len(weights)
        pair = rng.choices(pairs, weights=[max(w, floor) for w in weights])[0]
    return pair if rng.random() < 0.5 else (pair[1], pair[0])
