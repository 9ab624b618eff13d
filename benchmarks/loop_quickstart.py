"""The closed loop on the quickstart, end to end: rounds of simulated votes, DPO, and the
closing rounds whose decisions the loop itself takes, timed per phase.

From the quickstart's SFT adapter (`artifacts/quickstart`; trained first if it is missing, not
timed), `ftservice loop run serve/loop-quickstart.yaml` with `--rounds` rounds of `--votes`
votes each, every round followed by the votes that judge its adapter (the next round's, and a
closing round after the last), under one of these setups:

- `shipped`: round 1 compares two samples of the SFT adapter's answers to questions as people
  ask them (`data/domain/asked.jsonl`, temperature 1.0), annotators who know the answers (the
  default profile), 10% spammers, quality control on (gold comparisons, reliability), the
  answer-key judge, the shipped DPO template;
- `qc-off`: the same with quality control off (the spammers' votes count);
- `length-rule`: the old setup: annotators and judge both the length rule alone, no spammers,
  no quality control.

For each round: votes, pairs and what quality control left out; the DPO adapter's held-out
win rate against its SFT parent under the judge (answer key: right fact first, then plain
and short; ties half) with its interval; its held-out domain score and KL(base‖·) beside the
parent's; the decision of the round that judged it (promote, rollback, inconclusive,
refused) with its head-to-head votes; seconds per phase. Prints JSON, one object per setup.

    .venv/bin/python benchmarks/loop_quickstart.py [--setups shipped qc-off length-rule]
        [--votes 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPS = {
    "shipped": [],
    "qc-off": ["campaign.quality.enabled=false"],
    "length-rule": [
        "simulate.profile=length_rule",
        "simulate.spammers=0",
        "judge=preference",
        "campaign.quality.enabled=false",
    ],
}
HELD = ("rule", "prompts", "winrate", "interval", "won", "tied", "lost", "decided_winrate",
        "empty", "mean_words", "mean_words_parent", "domain", "domain_parent", "kl_from_base",
        "kl_from_base_parent")  # fmt: skip


def run_setup(setup: str, votes: int, rounds: int, env: dict, resume: str | None = None) -> dict:
    name = resume or f"loop-bench-{setup}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [
        sys.executable, "-m", "ftservice", "loop", "run", "serve/loop-quickstart.yaml",
        f"name={name}", f"campaign.name={name}", f"votes_per_round={votes}", f"rounds={rounds}",
        f"closing_votes={votes}", *SETUPS[setup], "--no-keep-serving", "--json",
        *(["--resume"] if resume else []),
    ]  # fmt: skip
    t0 = time.time()
    # the loop's progress (votes so far, ratings, training) goes to stderr, shown as it runs
    out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        sys.exit(f"{setup}: loop run exited {out.returncode}")
    report = json.loads(out.stdout[out.stdout.index("{\n") :])
    by_round = {r["round"]: r for r in report["rounds"]}
    summary = []
    for r in range(1, rounds + 1):
        row, judged = by_round[r], by_round.get(r + 1, {})
        lineage = REPO / "state" / "loops" / name / f"round-{r}" / "pairs.jsonl.lineage.json"
        held = row.get("held_out", {})
        summary.append({
            "round": r,
            "votes": row["votes"],
            "leader": row["leader"],
            "adapter": row["challenger"],
            "pairs": json.loads(lineage.read_text())["counts"] if lineage.is_file() else None,
            "quality": row.get("quality"),
            "simulated": row.get("simulated"),
            "held_out": {k: held.get(k) for k in HELD},
            "decision": judged.get("decision"),
            "seconds": row.get("seconds"),
            "seconds_round": round(sum((row.get("seconds") or {}).values()), 1),
            "examples": held.get("examples"),
        })  # fmt: skip
    return {
        "setup": setup,
        "overrides": SETUPS[setup],
        "rounds": summary,
        "closing_round_seconds": by_round[rounds + 1].get("seconds"),
        "alias": report["alias"],
        "seconds_total": round(wall, 1),
        "loop_json": str(REPO / "state" / "loops" / name / "loop.json"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--votes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--resume", help="Continue this benchmark loop (its name) after an interruption; one setup."
    )
    args = parser.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    if not (REPO / "artifacts" / "quickstart" / "ftservice.json").is_file():
        subprocess.run([sys.executable, "-m", "ftservice", "train", "cluster/jobs/quickstart.yaml"],
                       cwd=REPO, env=env, check=True)  # fmt: skip
    if args.resume and len(args.setups) != 1:
        sys.exit("--resume continues one loop: name its setup alone with --setups")
    results = [run_setup(s, args.votes, args.rounds, env, args.resume) for s in args.setups]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
