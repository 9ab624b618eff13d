"""Simulated annotators: K annotator keys that sign in and vote through the same HTTP routes
the page uses (never the database directly), judging each pair of answers by a written rule
(the shipped preference rule by default) with a share of random votes. For demos, the loop's
benchmark and tests; their keys are in the project `simulated`, so their votes are labelled."""

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

from ftservice.data import preference_rule
from ftservice.errors import FtserviceError

RULES: dict[str, Callable[[str, str], int]] = {"preference": preference_rule.prefers}
"""name -> judge(answer A, answer B) -> 0 (A is better) or 1 (B)."""
SIMULATED_PROJECT = "simulated"
RETRIES = 5


class SimulationError(FtserviceError):
    """Simulated annotators that cannot vote (the app refuses them or is unreachable)."""


@dataclass
class SimulationReport:
    votes: int = 0
    verdicts: Counter = field(default_factory=Counter)
    random_votes: int = 0
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
    rule: str = "preference",
    noise: float = 0.1,
    seed: int = 0,
    progress: Callable[[SimulationReport], None] | None = None,
) -> SimulationReport:
    """Up to `votes` votes from the annotators (one thread each) in a campaign of the app at
    `url`; an annotator stops at its quota or when the campaign has nothing left."""
    if rule not in RULES:
        raise SimulationError(f"rule '{rule}': use one of {', '.join(RULES)}")
    if not 0 <= noise <= 1:
        raise SimulationError(f"noise {noise}: a share between 0 and 1")
    judge, base = RULES[rule], url.rstrip("/")
    report, lock, t0 = SimulationReport(), threading.Lock(), time.time()
    errors: list[BaseException] = []
    claimed = [0]

    def annotator(k: int, key: str) -> None:
        rng = random.Random(seed * 1000 + k)
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
            randomly = rng.random() < noise
            verdict = rng.choice("ab") if randomly else "ab"[judge(shown["a"], shown["b"])]
            body = {"vote_id": uuid.uuid4().hex, "comparison_id": cid, "verdict": verdict}
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
                report.random_votes += randomly
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
