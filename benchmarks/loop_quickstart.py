"""One round of the closed loop on the quickstart, timed per phase.

From the quickstart's SFT adapter (`artifacts/quickstart`; trained first if it is missing, not
timed): `ftservice loop run serve/loop-quickstart.yaml` with one round of N simulated votes
(the shipped preference rule, 10% random), DPO from the round's leader, and the judgement on
the held-out questions: the DPO adapter's win rate against its SFT parent under the rule (ties
half) with its interval, and its domain score and forgetting (KL from the base) beside the
parent's. The closing round of votes is skipped (closing_votes=0): the held-out judgement is
what this measures. Prints JSON.

    .venv/bin/python benchmarks/loop_quickstart.py [--votes 300]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--votes", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.1)
    args = parser.parse_args()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ftservice = [sys.executable, "-m", "ftservice"]
    if not (REPO / "artifacts" / "quickstart" / "ftservice.json").is_file():
        subprocess.run([*ftservice, "train", "cluster/jobs/quickstart.yaml"], cwd=REPO, env=env,
                       check=True)  # fmt: skip
    name = f"loop-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [
        *ftservice, "loop", "run", "serve/loop-quickstart.yaml", f"name={name}",
        f"campaign.name={name}", f"votes_per_round={args.votes}", "closing_votes=0",
        f"simulate.noise={args.noise}", "--no-keep-serving", "--json",
    ]  # fmt: skip
    t0 = time.time()
    # the loop's progress (votes so far, ratings, training) goes to stderr, shown as it runs
    out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        sys.exit(f"loop run exited {out.returncode}")
    report = json.loads(out.stdout[out.stdout.index("{\n") :])
    r1 = report["rounds"][0]
    held = r1["held_out"]
    result = {
        "votes": r1["votes"],
        "noise": args.noise,
        "leader": r1["leader"],
        "dpo_adapter": r1["challenger"],
        "pairs": None,
        "seconds_per_phase": r1["seconds"],
        "seconds_total": round(wall, 1),
        "held_out": {
            k: held.get(k)
            for k in (
                "rule",
                "prompts",
                "winrate",
                "interval",
                "empty",
                "empty_parent",
                "mean_words",
                "mean_words_parent",
                "domain",
                "domain_parent",
                "kl_from_base",
                "kl_from_base_parent",
            )
        },
        "ratings_round_1": r1["ratings"],
        "examples": held.get("examples"),
        "loop_json": str(REPO / "state" / "loops" / name / "loop.json"),
    }
    pairs_file = REPO / "state" / "loops" / name / "round-1" / "pairs.jsonl.lineage.json"
    if pairs_file.is_file():
        result["pairs"] = json.loads(pairs_file.read_text())["counts"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
