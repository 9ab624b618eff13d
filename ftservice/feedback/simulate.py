"""Simulated annotators: K annotator keys that vote through the same HTTP routes the page uses
(never the database directly), as groups of people do. For demos, the loop's benchmark and
tests; their keys are in the project `simulated`, so their votes are labelled.

Profiles (`PROFILES`, each field overridable in the spec):
- `knows_answers` (the default): a person who knows the domain (`judges.knows_answers`): the
  answer that states the prompt's reference fact wins; both wrong is "both bad"; both right
  (or no reference), the plain, short one, a tie when they are within `tie_words` words.
  `accuracy` 0.89: MT-Bench's two human experts agreed on 81% of votes without ties (Zheng
  et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", Table 2, setup S1);
  two annotators who are each right with probability p and err independently agree with
  probability p² + (1 − p)², which is 0.81 at p = 0.89. `position_bias` 0.05: a share of
  votes that pick the left answer whatever it says (people show a small primacy effect in
  pairwise choices; the same paper measures position bias in LLM judges, not in people, so
  this is an assumption, kept small). `writes_answer` 0.5: where both answers are wrong,
  half the time the annotator also writes the right one in the page's "better answer" box
  (the reference sentence), taking `write_seconds` (8) more: an assumption too (no published
  rate; Label Studio and Argilla offer the box because experts use it), which the benchmark
  can vary.
- `length_rule`: the shipped preference rule alone (`preference_rule.prefers`: plain, no
  hedging, shorter), 10% random votes: the loop's first annotators, who never looked at
  whether an answer was right.
- `spammer`: votes a, b, tie or both bad at random, as soon as the answers are in.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from ftservice.config import Spec
from ftservice.data import judges
from ftservice.errors import FtserviceError
from ftservice.feedback.campaign import (
    CampaignSpec,
    Reference,
    load_prompts,
    load_references,
)

SIMULATED_PROJECT = "simulated"
RETRIES = 5
VERDICTS = ("a", "b", "tie", "both_bad")


class AnnotatorProfile(Spec):
    """How one group of simulated annotators votes."""

    judge: Literal["knows_answers", "length_rule", "random"] = Field(
        description="knows_answers: the reference fact first, then the style rule; "
        "length_rule: the style rule alone; random: any verdict."
    )
    accuracy: float = Field(
        ge=0, le=1, description="Share of votes kept as judged; the rest are flipped (a to b, "
        "b to a, a tie or both bad to a or b at random)."
    )  # fmt: skip
    position_bias: float = Field(
        ge=0, le=1, description="Share of votes that pick the left answer whatever it says."
    )
    tie_words: int = Field(
        ge=-1, description="Two answers equally good by the style rule within this many words "
        "are a tie (-1: never a tie)."
    )  # fmt: skip
    read_seconds: float = Field(
        ge=0, description="Time spent reading both answers before voting (±50%)."
    )
    writes_answer: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of 'both bad' votes (as judged, not flipped) that come with the "
        "right answer written in (the prompt's reference sentence), where there is one.",
    )
    write_seconds: float = Field(8.0, ge=0, description="Time spent writing it (±50%).")


PROFILES = {
    "knows_answers": AnnotatorProfile(
        judge="knows_answers",
        accuracy=0.89,
        position_bias=0.05,
        tie_words=1,
        read_seconds=2.0,
        writes_answer=0.5,
    ),
    "length_rule": AnnotatorProfile(
        judge="length_rule", accuracy=0.95, position_bias=0.0, tie_words=-1, read_seconds=2.0
    ),
    "spammer": AnnotatorProfile(
        judge="random", accuracy=1.0, position_bias=0.0, tie_words=-1, read_seconds=0.0
    ),
}
"""The named profiles; the module's docstring says where each number comes from."""


class SimulateSpec(Spec):
    """Simulated annotators: a group of one profile, and a share of spammers."""

    annotators: int = Field(8, ge=1, le=64, description="Simulated annotator keys.")
    profile: Literal["knows_answers", "length_rule"] = Field(
        "knows_answers",
        description="How the annotators who are not spammers judge (ftservice/feedback/"
        "simulate.py says where each default comes from).",
    )
    accuracy: float | None = Field(
        None, ge=0, le=1, description="Overrides the profile's accuracy (knows_answers: 0.89)."
    )
    position_bias: float | None = Field(
        None, ge=0, le=1, description="Overrides the profile's position bias (0.05)."
    )
    tie_words: int | None = Field(
        None, ge=-1, description="Overrides the profile's tie margin in words (1)."
    )
    read_seconds: float | None = Field(
        None, ge=0, description="Overrides the profile's reading time (2 s)."
    )
    writes_answer: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Overrides the share of 'both bad' votes that come with the right answer "
        "written in (knows_answers: 0.5).",
    )
    spammers: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the annotators who vote at random, as fast as they can "
        "(round(share × annotators), at least one when the share is above 0).",
    )
    seed: int = Field(0, description="Seed of their choices.")

    def profiles(self) -> list[AnnotatorProfile]:
        """One profile per annotator: the spammers last."""
        spam = 0 if self.spammers == 0 else max(1, round(self.spammers * self.annotators))
        spam = min(spam, self.annotators)
        overrides = {k: v for k, v in (("accuracy", self.accuracy),
                     ("position_bias", self.position_bias), ("tie_words", self.tie_words),
                     ("read_seconds", self.read_seconds), ("writes_answer", self.writes_answer))
                     if v is not None}  # fmt: skip
        careful = PROFILES[self.profile].model_copy(update=overrides)
        return [careful] * (self.annotators - spam) + [PROFILES["spammer"]] * spam


def question_key(messages: list[dict]) -> str:
    """How a prompt is looked up in the references: its last user turn, normalised."""
    return judges.normalise_answer(messages[-1]["content"])


def references_of(campaign: CampaignSpec) -> dict[str, Reference]:
    """`question_key` of each of the campaign's prompts -> its reference (the short fact and
    the whole right answer), for the prompts whose records carry one: what an annotator who
    knows the answers knows."""
    references = load_references(campaign.prompts)
    return {question_key(m): references[pid]
            for pid, m in load_prompts(campaign) if pid in references}  # fmt: skip


def verdict_of(
    profile: AnnotatorProfile, a: str, b: str, reference: str | None, rng: random.Random
) -> tuple[str, bool]:
    """(the verdict, whether it is not what the profile's judge says: flipped or biased)."""
    if profile.judge == "random":
        return rng.choice(VERDICTS), False
    if rng.random() < profile.position_bias:
        return "a", True
    if profile.judge == "knows_answers":
        verdict = judges.knows_answers(a, b, reference, profile.tie_words)
    else:
        verdict = judges.length_rule(a, b)
        if profile.tie_words >= 0 and judges.style_verdict(a, b, profile.tie_words) == "tie":
            verdict = "tie"
    if rng.random() >= profile.accuracy:
        flipped = {"a": "b", "b": "a"}.get(verdict) or rng.choice("ab")
        return flipped, True
    return verdict, False


class SimulationError(FtserviceError):
    """Simulated annotators that cannot vote (the app refuses them or is unreachable)."""


@dataclass
class SimulationReport:
    votes: int = 0
    verdicts: Counter = field(default_factory=Counter)
    random_votes: int = 0
    """Votes that are not what their annotator's judge says (flipped, biased or a spammer's)."""
    spam_votes: int = 0
    written_answers: int = 0
    retries: int = 0
    done_annotators: int = 0
    seconds: float = 0.0


def _call(url: str, key: str, method: str, body=None, timeout: float = 300):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _with_retries(report, lock, url: str, key: str, method: str, body=None):
    """(status, text) of a request, sent again after a dropped connection, a 5xx or a 429
    (the same request: a vote keeps its id, so a retry is a replay, never a second vote)."""
    for attempt in range(RETRIES + 1):
        try:
            status, text = _call(url, key, method, body)
        except (OSError, http.client.HTTPException) as e:
            status, text = None, str(e)
        if status is not None and status < 500 and status != 429:
            return status, text
        if attempt < RETRIES:
            with lock:
                report.retries += 1
            time.sleep(min(2**attempt, 10))
    raise SimulationError(f"the app kept failing ({status}): {text[:300]}")


def answers(events_text: str) -> tuple[dict[str, str], list[str]]:
    """Both answers from a comparison's SSE stream, and any error events."""
    texts, errors = {"a": "", "b": ""}, []
    for line in events_text.splitlines():
        if not line.startswith("data: "):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            errors.append(f"{event.get('side')}: {event['error']}")
        elif "text" in event:
            texts[event["side"]] += event["text"]
    return texts, errors


def simulate(
    url: str,
    campaign: str,
    keys: list[str],
    votes: int,
    spec: SimulateSpec,
    references: dict[str, Reference] | None = None,
    progress: Callable[[SimulationReport], None] | None = None,
) -> SimulationReport:
    """Up to `votes` votes from the annotators (one thread each, `spec.profiles()` in order
    of `keys`) in a campaign of the app at `url`; an annotator stops at its quota or when the
    campaign has nothing left. `references` (`references_of`): `question_key` of a prompt ->
    its reference, whose fact an annotator who knows the answers judges by and whose whole
    answer a profile that writes answers sends as the vote's better answer."""
    profiles, references, base = spec.profiles(), references or {}, url.rstrip("/")
    if len(profiles) != len(keys):
        raise SimulationError(f"{len(keys)} keys for {len(profiles)} simulated annotators")
    report, lock, t0 = SimulationReport(), threading.Lock(), time.time()
    errors: list[BaseException] = []
    claimed = [0]

    def annotator(k: int, key: str) -> None:
        rng, profile = random.Random(spec.seed * 1000 + k), profiles[k]
        while True:
            with lock:  # claim one of the votes left, so that the total is never overshot
                if claimed[0] >= votes:
                    return
                claimed[0] += 1
            status, text = _with_retries(
                report, lock, f"{base}/arena/api/campaigns/{campaign}/next", key, "POST", {}
            )
            if status != 200:
                raise SimulationError(f"next comparison: HTTP {status}: {text[:300]}")
            comparison = json.loads(text)
            if comparison.get("done"):
                with lock:
                    report.done_annotators += 1
                    claimed[0] -= 1  # for another annotator to cast
                return
            cid = comparison["id"]
            status, text = _with_retries(
                report, lock, f"{base}/arena/api/comparisons/{cid}/stream", key, "GET"
            )
            shown, failed = answers(text)
            if status != 200 or failed:
                raise SimulationError(f"answers of {cid}: HTTP {status} {failed or text[:300]}")
            reference = references.get(question_key(comparison["prompt"]))
            fact = reference.answer if reference else None
            verdict, randomly = verdict_of(profile, shown["a"], shown["b"], fact, rng)
            if profile.read_seconds:
                time.sleep(profile.read_seconds * rng.uniform(0.5, 1.5))
            body = {"vote_id": uuid.uuid4().hex, "comparison_id": cid, "verdict": verdict}
            writes = verdict == "both_bad" and not randomly and reference is not None
            if writes and rng.random() < profile.writes_answer:
                body["better_answer"] = reference.output
                time.sleep(profile.write_seconds * rng.uniform(0.5, 1.5))
            status, text = _with_retries(report, lock, f"{base}/arena/api/votes", key, "POST", body)
            if status == 409 and '"round_closed"' in text:  # a loop closed the round: done
                with lock:
                    report.done_annotators += 1
                return
            if status != 200:
                raise SimulationError(f"vote on {cid}: HTTP {status}: {text[:300]}")
            with lock:
                report.votes += 1
                report.verdicts[verdict] += 1
                report.random_votes += randomly or profile.judge == "random"
                report.spam_votes += profile.judge == "random"
                report.written_answers += "better_answer" in body
                report.seconds = time.time() - t0
                if progress is not None:
                    progress(report)

    def run(k: int, key: str) -> None:
        try:
            annotator(k, key)
        except BaseException as e:  # the first failure is raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k, key), daemon=True)
               for k, key in enumerate(keys)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.time() - t0
    if errors:
        raise errors[0]
    return report
