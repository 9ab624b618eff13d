"""Running the loop: its rounds on the live app, each step's outcome stored as it is done, and
the entry point `ftservice loop run`."""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from ftservice.artifacts import ArtifactError, FeedbackLineage, load_artifact, update_metrics
from ftservice.config import JobSpec, load_spec
from ftservice.data.judges import JUDGES
from ftservice.feedback import rounds
from ftservice.feedback import votes as store_votes
from ftservice.feedback.campaign import CampaignSpec, load_prompts, load_references
from ftservice.feedback.export import export_rows, write_export
from ftservice.feedback.leaderboard import leaderboard
from ftservice.feedback.quality import CountedVotes, assess, counted_votes
from ftservice.feedback.simulate import SIMULATED_PROJECT, references_of, simulate
from ftservice.loop.spec import LoopError, LoopSpec, decide, head_to_head, load_loop, wilson
from ftservice.models import resolve_model
from ftservice.raycluster import init_ray
from ftservice.serve.app import build_app
from ftservice.serve.deploy import http_options
from ftservice.serve.spec import ServeSpec, load_serve_spec
from ftservice.store.db import open_store
from ftservice.store.keys import create_key, revoke_key
from ftservice.store.models import Loop, LoopRound
from ftservice.train.driver import evaluate_remote, train

# ---- the app over HTTP -----------------------------------------------------------------------


class AppClient:
    """The loop's calls to the live app, with a key of its own (admin + inference)."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url.rstrip("/"), key

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 300):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"error": {"message": text[:500]}}

    def models(self) -> dict[str, dict]:
        status, body = self.call("GET", "/v1/models")
        if status != 200:
            raise LoopError(f"GET {self.url}/v1/models: HTTP {status}: {body}")
        return {m["id"]: m for m in body["data"]}

    def answer(self, model: str, messages: list[dict], max_tokens: int) -> str:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0.0}  # fmt: skip
        for attempt in range(3):
            status, out = self.call("POST", "/v1/chat/completions", body)
            if status == 200:
                return out["choices"][0]["message"]["content"] or ""
            if status not in (429, 503) or attempt == 2:
                raise LoopError(f"{model}: HTTP {status}: {out}")
            time.sleep(2)
        raise AssertionError("unreachable")


def app_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def held_out_judgement(
    client: AppClient,
    challenger: str,
    parent: str,
    prompts: list[tuple[str, list[dict]]],
    max_tokens: int,
    rule: str | None,
    confidence: float,
    references: dict[str, str] | None = None,
) -> dict:
    """Greedy answers of both to the held-out prompts through the API, judged by the named
    judge (`judges.JUDGES`; `references`: prompt id -> its reference fact): the challenger's
    win rate (ties half), and how many answers of each are empty."""
    with ThreadPoolExecutor(8) as pool:  # the app batches concurrent requests
        mine = list(pool.map(lambda p: client.answer(challenger, p[1], max_tokens), prompts))
        theirs = list(pool.map(lambda p: client.answer(parent, p[1], max_tokens), prompts))
    out: dict = {
        "prompts": len(prompts),
        "empty": sum(not a.strip() for a in mine),
        "empty_parent": sum(not a.strip() for a in theirs),
        "mean_words": sum(len(a.split()) for a in mine) / max(len(mine), 1),
        "mean_words_parent": sum(len(a.split()) for a in theirs) / max(len(theirs), 1),
        "examples": [
            {"prompt": p[1][-1]["content"], challenger: a, parent: b}
            for p, a, b in list(zip(prompts, mine, theirs, strict=True))[:3]
        ],
    }
    out["empty_share"] = out["empty"] / max(len(prompts), 1)
    if rule is not None:
        judge, references = JUDGES[rule], references or {}
        scores = [judge(a, b, references.get(p[0]))
                  for p, a, b in zip(prompts, mine, theirs, strict=True)]  # fmt: skip
        wins = sum(scores)
        won, lost = scores.count(1.0), scores.count(0.0)
        # where most questions are ties (both right, alike), the share of the decided ones
        # is what can move: won / (won + lost)
        out |= {"won": won, "tied": scores.count(0.5), "lost": lost,
                "decided_winrate": won / (won + lost) if won + lost else None}  # fmt: skip
        lo, hi = wilson(wins, len(prompts), confidence)
        out |= {"rule": rule, "wins": wins, "winrate": wins / max(len(prompts), 1),
                "interval": [lo, hi]}  # fmt: skip
    return out


def stored_evaluation(parent, job: JobSpec) -> dict | None:
    """The evaluation the parent's artifact holds, when it was made as the job's own will be
    (the same domain questions, general prompts, answer length and system prompt, on the
    whole domain set): a second run would give the same numbers, minutes later."""
    found = (parent.meta.metrics or {}).get("evaluation")
    spec = parent.meta.spec or {}
    if not found or not found.get("domain") or not job.eval.domain:
        return None
    mine = (job.eval.domain, job.eval.general, job.eval.max_new_tokens, job.data.system_prompt)
    ev, data = spec.get("eval") or {}, spec.get("data") or {}
    theirs = (ev.get("domain"), ev.get("general"), ev.get("max_new_tokens"),
              data.get("system_prompt"))  # fmt: skip
    if mine != theirs or not Path(job.eval.domain).is_file():
        return None
    questions = [x for x in Path(job.eval.domain).read_text().splitlines() if x.strip()]
    return found if found["domain"].get("total") == len(questions) else None


# ---- the loop ----------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _echo(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Context:
    spec: LoopSpec
    serve: ServeSpec
    store: object
    client: AppClient
    out: Path
    base_name: str


class LoopRunner:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.spec = ctx.spec
        self.store = ctx.store
        self.campaign = ctx.spec.campaign.name
        self.timings: dict[str, float] = {}

    # ---- rows -------------------------------------------------------------------------------

    def row(self, r: int) -> LoopRound | None:
        with self.store() as session:
            return session.get(LoopRound, (self.spec.name, r))

    def details(self, r: int) -> dict:
        return json.loads(self.row(r).details or "{}")

    def update(self, r: int, details: dict | None = None, **fields) -> None:
        with self.store.begin() as session:
            row = session.get(LoopRound, (self.spec.name, r), with_for_update=True)
            for k, v in fields.items():
                setattr(row, k, v)
            if details:
                row.details = json.dumps(json.loads(row.details or "{}") | details, default=str)

    def timed(self, r: int, phase: str, seconds: float) -> None:
        times = self.details(r).get("seconds", {})
        self.update(r, {"seconds": times | {phase: round(seconds, 1)}})

    # ---- who competes -----------------------------------------------------------------------

    def candidates(self) -> list[str]:
        c = self.spec.candidates
        if isinstance(c, list):
            return list(c)
        summary = json.loads((Path(c.sweep) / "sweep.json").read_text())
        names = [Path(t["artifact"]).name for t in summary["trials"]
                 if t["state"] == "completed" and t.get("artifact")][: c.top]  # fmt: skip
        if not names:
            raise LoopError(f"{c.sweep}: no completed trial with an artifact")
        return names

    def excluded(self) -> set[str]:
        """Adapters a decision took out of the running (rolled back, refused)."""
        out = set()
        for event in rounds.alias_history(self.store, self.ctx.serve.name):
            if event["loop"] == self.spec.name and event["action"] in ("rollback", "refused"):
                out.add(event["subject"])
        return out

    def round_models(self, r: int) -> tuple[list[str], list | None]:
        if r == 1:
            models = self.candidates() + ([self.ctx.base_name] if self.spec.include_base else [])
            return models, None
        prev = self.row(r - 1)
        models = [m for m in json.loads(prev.models) if m not in self.excluded()]
        if prev.challenger and prev.challenger not in models:
            models.append(prev.challenger)
        focus = None
        if prev.challenger:
            parent = self.details(r - 1)["leader"]
            focus = [prev.challenger, parent, self.spec.promotion.focus_share]
        return models, focus

    # ---- phases -----------------------------------------------------------------------------

    def open_round(self, r: int, quota: int) -> None:
        models, focus = self.round_models(r)
        served = self.ctx.client.models()
        missing = [m for m in models if m not in served]
        if missing:
            raise LoopError(
                f"round {r}: {', '.join(missing)} not served by the app at "
                f"{self.ctx.client.url} (GET /v1/models); add their registry to "
                f"{self.spec.serve}'s registries, or publish them"
            )
        refused = [m for m in models if not served[m].get("servable", True)]
        if refused:
            raise LoopError(f"round {r}: the gate refuses {', '.join(refused)}")
        with self.store.begin() as session:
            session.add(LoopRound(
                loop=self.spec.name, round=r, campaign=self.campaign, models=json.dumps(models),
                focus=json.dumps(focus) if focus else None, quota=quota, phase="voting",
                opened_at=_now(), details="{}",
            ))  # fmt: skip
        pair = f"; {focus[2]:.0%} of comparisons {focus[0]} vs {focus[1]}" if focus else ""
        _echo(f"round {r}: {quota} votes among {', '.join(models)}{pair}")

    def collect(self, r: int) -> None:
        row = self.row(r)
        t0 = time.time()
        count = rounds.round_vote_count(self.store, self.campaign, r)
        if count < row.quota and self.spec.simulate is None:
            self.wait_for_people(r, row.quota)
        while count < row.quota and self.spec.simulate is not None:
            # gold comparisons' votes are not the round's: simulate until its quota is met
            cast = self.simulate(r, row.quota - count)
            count = rounds.round_vote_count(self.store, self.campaign, r)
            if not cast:  # the campaign has nothing left to issue
                break
        if count < row.quota:
            raise LoopError(f"round {r}: {count} of {row.quota} votes; the campaign ran out "
                            "of prompts (raise votes_per_prompt or add prompt files)")  # fmt: skip
        with self.store.begin() as session:  # no vote of the round is taken after this
            loop_round = session.get(LoopRound, (self.spec.name, r), with_for_update=True)
            loop_round.closed_at, loop_round.phase = _now(), "closed"
        self.update(r, votes=rounds.round_vote_count(self.store, self.campaign, r))
        self.timed(r, "votes", time.time() - t0)

    def simulate(self, r: int, remaining: int) -> int:
        """Simulated annotators cast up to `remaining` votes in round r; how many they cast."""
        sim = self.spec.simulate
        run = secrets.token_hex(3)
        names = [f"sim-{self.spec.name}-r{r}-{run}-{k}" for k in range(sim.annotators)]
        keys = [store_votes.add_annotator(self.store, n, self.campaign,
                                          project=SIMULATED_PROJECT) for n in names]  # fmt: skip
        last = [0.0]

        def progress(report) -> None:
            if report.votes == remaining or time.time() - last[0] > 10:
                last[0] = time.time()
                _echo(f"round {r}: {report.votes}/{remaining} simulated votes "
                      f"({report.seconds:.0f} s)")  # fmt: skip

        references = references_of(self.spec.campaign)
        spec = sim.model_copy(update={"seed": sim.seed * 100 + r})
        try:
            report = simulate(self.ctx.client.url, self.campaign, keys, remaining, spec,
                              references, progress)  # fmt: skip
        finally:
            for n in names:
                revoke_key(self.store, n)
        self.update(r, {"simulated": {"votes": report.votes, "verdicts": dict(report.verdicts),
                                      "off_judge": report.random_votes,
                                      "spam": report.spam_votes,
                                      "written_answers": report.written_answers}})  # fmt: skip
        return report.votes

    def wait_for_people(self, r: int, quota: int) -> None:
        url = f"{self.ctx.client.url}/arena"
        _echo(f"round {r}: waiting for {quota} votes on {url} (campaign {self.campaign}; "
              f"annotator keys: ftservice feedback annotators add NAME --campaign "
              f"{self.campaign})")  # fmt: skip
        last = -1
        while (count := rounds.round_vote_count(self.store, self.campaign, r)) < quota:
            if count != last:
                _echo(f"round {r}: {count}/{quota} votes")
                last = count
            time.sleep(5)

    def counted(self, r: int) -> CountedVotes:
        """The round's votes that count, with each annotator's quality assessed on all their
        votes in the campaign so far (gold comparisons and shared items of every round)."""
        everything, items = store_votes.effective_rows(self.store, self.campaign)
        spec = self.spec.campaign.quality
        quality = assess(everything, items, spec)
        in_round = {v.vote_id for v in rounds.round_votes(self.store, self.campaign, r)}
        mine = [v for v in everything if v["vote_id"] in in_round]
        return counted_votes(mine, items, spec, quality)

    def votes_of(self, r: int) -> list[dict]:
        return self.counted(r).votes

    def rate(self, r: int) -> dict:

        votes = self.votes_of(r)
        board = leaderboard(votes, self.ctx.base_name, resamples=200, seed=r)
        table = [{k: row[k] for k in ("model", "rating", "ci95", "votes", "won", "lost")}
                 for row in board["ratings"]]  # fmt: skip
        _echo(f"round {r}: {len(votes)} votes")
        for row in table:
            _echo(f"  {row['model']:<28} {row['rating']:7.1f}  [{row['ci95'][0]:.0f}, "
                  f"{row['ci95'][1]:.0f}]  {row['won']} won {row['lost']} lost")  # fmt: skip
        self.update(r, {"ratings": table})
        for row in table:  # each artifact carries its rating in each round it competed in
            self.note_rating(row["model"], r, row)
        return board

    def note_rating(self, name: str, r: int, row: dict) -> None:

        for registry in self.ctx.serve.registries:
            try:
                artifact = load_artifact(name, registry)
            except ArtifactError:
                continue
            ratings = [x for x in (artifact.meta.metrics.get("feedback_ratings") or [])
                       if not (x["loop"] == self.spec.name and x["round"] == r)]  # fmt: skip
            ratings.append({"loop": self.spec.name, "round": r, "rating": row["rating"],
                            "ci95": row["ci95"], "votes": row["votes"]})  # fmt: skip
            update_metrics(artifact, {"feedback_ratings": ratings})
            return

    def leader(self, r: int, table: list[dict]) -> str:
        excluded = self.excluded() | {self.ctx.base_name}
        for row in table:  # best rated first
            if row["model"] not in excluded:
                return row["model"]
        # no rating (a round of a model against itself): the round's first adapter in the running
        for model in json.loads(self.row(r).models):
            if model not in excluded:
                return model
        raise LoopError(f"round {r}: no adapter left to train from (all rolled back)")

    def judge_previous(self, r: int) -> None:
        """Decide on the adapter the previous round made, from this round's votes."""
        prev = self.row(r - 1)
        if r == 1 or not prev.challenger or "decision" in self.details(r):
            return
        challenger, parent = prev.challenger, self.details(r - 1)["leader"]
        promo = self.spec.promotion
        h2h = head_to_head(self.votes_of(r), challenger, parent, promo.confidence)
        held_out = self.details(r - 1)["held_out"]
        action, reasons = decide(h2h, held_out, promo)
        state = rounds.alias_state(self.store, self.ctx.serve.name, promo.alias)
        target = challenger if action == "promote" else state.target
        evidence = {"head_to_head": h2h, "held_out": held_out, "reasons": reasons,
                    "parent": parent, "round_votes": self.row(r).votes}  # fmt: skip
        event = rounds.record_alias(
            self.store, self.ctx.serve.name, promo.alias, action, target, evidence,
            subject=challenger, loop=self.spec.name, round_=r,
        )  # fmt: skip
        self.update(r, {"decision": {"action": action, "subject": challenger, "parent": parent,
                                     "reasons": reasons, "event": event["id"],
                                     "head_to_head": h2h}})  # fmt: skip
        rate = "-" if h2h["winrate"] is None else f"{h2h['winrate']:.2f}"
        _echo(f"round {r}: {challenger} vs {parent}: win rate {rate} "
              f"[{h2h['interval'][0]:.2f}, {h2h['interval'][1]:.2f}] over {h2h['votes']} "
              f"votes → {action.upper()} ({'; '.join(reasons)})")  # fmt: skip

    def ensure_alias(self, r: int, leader: str) -> None:
        alias = self.spec.promotion.alias
        if rounds.alias_state(self.store, self.ctx.serve.name, alias) is None:
            rounds.record_alias(
                self.store, self.ctx.serve.name, alias, "create", leader,
                {"reason": f"the leader of round {r}", "ratings": self.details(r)["ratings"]},
                subject=leader, loop=self.spec.name, round_=r,
            )  # fmt: skip
            _echo(f"alias {alias} → {leader}")

    def export(self, r: int) -> tuple[Path, dict]:

        counted = self.counted(r)
        votes = counted.votes
        items = store_votes.items_of(self.store, [v["comparison_id"] for v in votes])
        rows, lineage, counts = export_rows(votes, items, "trl")
        counts |= {f"left_out_{k}": n for k, n in counted.dropped.items() if n}
        flagged = {q.annotator: q.flags for q in counted.annotators.values() if q.flags}
        self.update(r, {"quality": {"left_out": counted.dropped, "flagged": flagged}})
        folder = self.ctx.out / f"round-{r}"
        pairs = folder / "pairs.jsonl"
        write_export(rows, lineage, counts, pairs,
                     {"campaign": self.campaign, "loop": self.spec.name, "round": r,
                      "format": "trl", "votes": len(votes)})  # fmt: skip
        ids = "".join(v["vote_id"] + "\n" for v in votes)
        (folder / "vote-ids.txt").write_text(ids)
        digest = hashlib.sha256(pairs.read_bytes()).hexdigest()
        _echo(
            f"round {r}: exported {counts.get('pairs', 0)} pairs from {len(votes)} votes "
            f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) to {pairs}"
        )
        return pairs, {"counts": counts, "pairs_fingerprint": digest, "vote_ids": ids,
                       "votes": len(votes)}  # fmt: skip

    def dpo_spec(self, r: int, leader: str, pairs: Path) -> JobSpec:
        template = load_spec(self.spec.dpo)
        if template.stage != "dpo":
            raise LoopError(f"{self.spec.dpo}: the DPO template has stage: {template.stage}")
        parent = self.find(leader)
        data = template.model_dump(mode="json")
        data["name"] = f"{self.spec.name}-r{r}"
        data["data"] |= {"train": [str(pairs)], "eval": [], "format": "auto"}
        data["dpo"]["parent"] = parent.location
        data["output"]["registry"] = self.ctx.serve.registries[0]
        return JobSpec.model_validate(data)

    def find(self, name: str):

        for registry in self.ctx.serve.registries:
            try:
                return load_artifact(name, registry)
            except ArtifactError:
                continue
        raise LoopError(f"no artifact '{name}' in {', '.join(self.ctx.serve.registries)}")

    def train(self, r: int) -> None:

        details = self.details(r)
        leader = details["leader"]
        t0 = time.time()
        pairs, export = self.export(r)
        self.timed(r, "export", time.time() - t0)
        if not export["counts"].get("rows"):
            raise LoopError(f"round {r}: its votes gave no preference pair (all ties?)")
        job = self.dpo_spec(r, leader, pairs)
        feedback = FeedbackLineage(
            loop=self.spec.name, campaign=self.campaign, round=r, votes=export["votes"],
            pairs=export["counts"]["rows"], pairs_fingerprint=export["pairs_fingerprint"],
            vote_ids="feedback-vote-ids.txt",
        )  # fmt: skip
        t0 = time.time()
        counts = export["counts"]
        written = counts.get("pairs_from_edits", 0)
        _echo(f"round {r}: DPO from {leader} on {counts['rows']} pairs ({counts['pairs']} from "
              f"votes, {written} of a written answer over a voted one) (Ray Train, beside the "
              f"app) → {job.name}")  # fmt: skip
        result = train(job, feedback=feedback,
                       extra_files={"feedback-vote-ids.txt": export["vote_ids"]})  # fmt: skip
        self.timed(r, "train", time.time() - t0)
        artifact = result.artifact
        t0 = time.time()
        if "parent_evaluation" not in details:
            parent = self.find(leader)
            parent_eval = stored_evaluation(parent, job)
            if parent_eval is None:
                parent_eval = evaluate_remote(job, parent, resolve_model(job.model))
            else:
                _echo(f"round {r}: {leader}'s evaluation is its artifact's (same questions, "
                      "prompts, system prompt and answer length)")  # fmt: skip
            self.update(r, {"parent_evaluation": parent_eval})
        parent_eval = self.details(r)["parent_evaluation"]
        self.timed(r, "evaluate", time.time() - t0)
        t0 = time.time()
        status, body = self.ctx.client.call(
            "POST", "/v1/load_lora_adapter", {"lora_name": artifact.name, "lora_path": ""}
        )
        if status != 200:  # the gate refused it: the loop cannot go on with it
            raise LoopError(f"round {r}: the app refused {artifact.name}: HTTP {status} {body}")
        held = self.judge_held_out(artifact.name, leader)
        held |= self.domain_change(result.evaluation, parent_eval)
        self.timed(r, "held_out", time.time() - t0)
        self.update(r, {"held_out": held, "challenger_evaluation": result.evaluation})
        promo = self.spec.promotion
        state = rounds.alias_state(self.store, self.ctx.serve.name, promo.alias)
        with_canary = promo.canary_share > 0
        recorded = any(  # a kill after the event and before the phase: not twice
            e["action"] == "canary" and e["subject"] == artifact.name and e["round"] == r
            for e in rounds.alias_history(self.store, self.ctx.serve.name)
        )
        if not recorded:
            rounds.record_alias(
                self.store, self.ctx.serve.name, promo.alias, "canary", state.target,
                {"reason": f"new adapter of round {r}", "parent": leader, "held_out": held},
                canary=artifact.name if with_canary else None, canary_share=promo.canary_share,
                subject=artifact.name, loop=self.spec.name, round_=r,
            )  # fmt: skip
        self.update(r, phase="done", challenger=artifact.name)
        _echo(self.held_out_line(r, artifact.name, leader, held))

    def judge_held_out(self, challenger: str, parent: str) -> dict:
        prompts = load_prompts(CampaignSpec(name="held-out", prompts=self.spec.held_out))
        prompts = prompts[: self.spec.held_out_limit]
        return held_out_judgement(
            self.ctx.client, challenger, parent, prompts,
            self.spec.campaign.generation.max_tokens, self.spec.judge,
            self.spec.promotion.confidence,
            {k: ref.answer for k, ref in load_references(self.spec.held_out).items()},
        )  # fmt: skip

    @staticmethod
    def domain_change(mine: dict, parents: dict) -> dict:
        out = {}
        a, b = (mine or {}).get("domain"), (parents or {}).get("domain")
        if a and b:
            out |= {"domain": a["accuracy"], "domain_parent": b["accuracy"],
                    "domain_drop": b["accuracy"] - a["accuracy"]}  # fmt: skip
        fa, fb = (mine or {}).get("forgetting"), (parents or {}).get("forgetting")
        if fa and fb:
            out |= {"kl_from_base": fa["kl_from_base"], "kl_from_base_parent": fb["kl_from_base"]}
        return out

    @staticmethod
    def held_out_line(r: int, name: str, parent: str, held: dict) -> str:
        parts = [f"round {r}: {name} published and served beside {parent}"]
        if "winrate" in held:
            parts.append(f"held-out win rate under '{held['rule']}' {held['winrate']:.2f} "
                         f"[{held['interval'][0]:.2f}, {held['interval'][1]:.2f}] on "
                         f"{held['prompts']} prompts ({held['won']} won, {held['tied']} tied, "
                         f"{held['lost']} lost)")  # fmt: skip
        if "domain" in held:
            parts.append(f"domain score {held['domain']:.1%} (parent {held['domain_parent']:.1%})")
        parts.append(f"{held['empty']} empty answers")
        return "; ".join(parts)

    # ---- the whole run ----------------------------------------------------------------------

    def closing_votes(self) -> int:
        closing = self.spec.closing_votes
        return self.spec.votes_per_round if closing is None else closing

    def last_round(self) -> int:
        return self.spec.rounds + (1 if self.closing_votes() else 0)

    def run(self) -> dict:
        for r in range(1, self.last_round() + 1):
            row = self.row(r)
            if row is not None and row.phase == "done":
                continue
            if row is None:
                quota = self.spec.votes_per_round if r <= self.spec.rounds else None
                self.open_round(r, quota or self.closing_votes())
            if self.row(r).phase == "voting":
                self.collect(r)
            if "ratings" not in self.details(r):
                self.rate(r)
            self.judge_previous(r)
            decision = self.details(r).get("decision", {}).get("action")
            stop = self.spec.stop_when_not_promoted and decision not in (None, "promote")
            if r > self.spec.rounds or stop:
                self.update(r, phase="done")
                if stop:
                    _echo(f"round {r}: not promoted; the loop stops (stop_when_not_promoted)")
                    break
                continue
            if "leader" not in self.details(r):
                leader = self.leader(r, self.details(r)["ratings"])
                self.update(r, {"leader": leader}, leader=leader)
            self.ensure_alias(r, self.details(r)["leader"])
            self.train(r)
        return self.report()

    def report(self) -> dict:
        with self.store() as session:
            rows = session.scalars(
                select(LoopRound).where(LoopRound.loop == self.spec.name)
                .order_by(LoopRound.round)
            ).all()  # fmt: skip
            out_rounds = [{"round": x.round, "models": json.loads(x.models), "quota": x.quota,
                           "votes": x.votes, "leader": x.leader, "challenger": x.challenger,
                           "phase": x.phase, **json.loads(x.details)} for x in rows]  # fmt: skip
        report = {
            "loop": self.spec.name,
            "app": self.ctx.serve.name,
            "campaign": self.campaign,
            "rounds": out_rounds,
            "alias": rounds.alias_state(
                self.store, self.ctx.serve.name, self.spec.promotion.alias
            ).__dict__,
            "history": [
                e
                for e in rounds.alias_history(self.store, self.ctx.serve.name)
                if e["loop"] == self.spec.name
            ],
        }
        self.ctx.out.mkdir(parents=True, exist_ok=True)
        (self.ctx.out / "loop.json").write_text(json.dumps(report, indent=1, default=str))
        plot_rounds(out_rounds, self.ctx.out / "rounds.png", self.spec.name)
        return report


def plot_rounds(out_rounds: list[dict], path: Path, title: str) -> None:
    """Each model's rating with its interval, round by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float, float]]] = {}
    for x in out_rounds:
        for row in x.get("ratings", []):
            lo, hi = row["ci95"]
            series.setdefault(row["model"], []).append((x["round"], row["rating"], lo, hi))
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (model, points) in enumerate(sorted(series.items())):
        xs = [p[0] + (k - len(series) / 2) * 0.04 for p in points]
        ys = [p[1] for p in points]
        err = [
            [max(0.0, p[1] - p[2]) if not math.isnan(p[2]) else 0 for p in points],
            [max(0.0, p[3] - p[1]) if not math.isnan(p[3]) else 0 for p in points],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=model)
    ax.set_xlabel("round")
    ax.set_ylabel("rating (Bradley–Terry, 95% interval)")
    ax.set_xticks(sorted({x["round"] for x in out_rounds}))
    ax.set_title(f"{title}: ratings per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- entry point -------------------------------------------------------------------------------


def run_loop(
    path: str, overrides: list[str] | None = None, resume: bool = False, address=None
) -> dict:
    """`ftservice loop run`: the loop on the app its serve spec names (started here on the
    local Ray, or the cluster at `address`, when it is not answering)."""

    spec = load_loop(path, overrides)
    serve_spec = load_serve_spec(spec.serve)
    store = open_store(serve_spec.store.url)
    base_name = serve_spec.base_name or serve_spec.model.name
    with store() as session:
        row = session.get(Loop, spec.name)
        other = session.scalars(
            select(Loop).where(Loop.campaign == spec.campaign.name, Loop.name != spec.name)
        ).first()
    if other is not None:
        raise LoopError(f"campaign '{spec.campaign.name}' belongs to loop '{other.name}'; give "
                        "this loop a campaign of its own (campaign.name)")  # fmt: skip
    if row is not None and not resume:
        raise LoopError(
            f"loop '{spec.name}' exists ({row.state}, started {row.started_at}): "
            "continue it with --resume, or give the new loop another name"
        )
    if row is None and resume:
        raise LoopError(f"no loop '{spec.name}' to resume in {serve_spec.store.url}")
    url = f"http://{serve_spec.host}:{serve_spec.port}"
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    init_ray(address)  # Ray Train runs the DPO rounds beside the app
    if not app_healthy(url):
        start_app(serve_spec)
    campaign = spec.campaign.model_copy(
        update={
            "prompts": [str(Path(p).resolve()) for p in spec.campaign.prompts],
            "models": ["*"],
        }
    )
    store_votes.declare_campaign(store, serve_spec.name, base_name, campaign)
    if row is None:
        with store.begin() as session:
            session.add(Loop(name=spec.name, app=serve_spec.name, campaign=campaign.name,
                             spec=spec.model_dump_json(), state="running",
                             started_at=_now()))  # fmt: skip
    key_name = f"loop-{spec.name}-{secrets.token_hex(3)}"
    key = create_key(store, key_name, ["admin", "inference"], project="loop")
    out = Path(spec.output_dir) / spec.name
    t0 = time.time()
    try:
        runner = LoopRunner(Context(spec, serve_spec, store, AppClient(url, key), out, base_name))
        report = runner.run()
    finally:
        revoke_key(store, key_name)
    with store.begin() as session:
        loop_row = session.get(Loop, spec.name)
        loop_row.state, loop_row.finished_at = "finished", _now()
    report["seconds"] = round(time.time() - t0, 1)
    report["url"] = url
    (out / "loop.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def start_app(serve_spec: ServeSpec) -> None:
    from ray import serve

    _echo(f"starting the app {serve_spec.name} at http://{serve_spec.host}:{serve_spec.port}")
    serve.start(http_options=http_options(serve_spec))
    serve.run(build_app(serve_spec), name=serve_spec.name, route_prefix="/", blocking=False)
