"""ASHA against the full grid on the same space and task, in one run.

Runs the shipped sweep (`tune/lora-rank-lr.yaml`, or another) twice on the embedded Ray:
once with its ASHA scheduler, once with no early stopping (FIFO: every trial to the end).
Prints training steps spent (the last step each trial reached, summed) and the best metric
each found. Goal: ASHA within 2% of the grid's best with at most 40% of its steps.

    .venv/bin/python benchmarks/asha_vs_grid.py [--sweep tune/lora-rank-lr.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(sweep_file: Path, scheduler: str, out: Path) -> dict:
    spec = yaml.safe_load(sweep_file.read_text())
    spec["scheduler"]["type"] = scheduler
    spec["name"] = f"{spec['name']}-{scheduler}"
    spec["output_dir"] = str(out)
    path = out / f"{scheduler}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ftservice", "sweep", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads((out / spec["name"] / "sweep.json").read_text())
    steps = sum(max((x for x, _ in t["curve"]), default=0) for t in summary["trials"])
    return {
        "wall_s": wall,
        "trials": len(summary["trials"]),
        "steps_spent": steps,
        "best": summary["best"]["best"] if summary["best"] else None,
        "best_params": summary["best"]["params"] if summary["best"] else None,
        "states": [t["state"] for t in summary["trials"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default="tune/lora-rank-lr.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftb-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        grid = run(REPO / args.sweep, "fifo", tmp)
        asha = run(REPO / args.sweep, "asha", tmp)
    print(
        json.dumps(
            {
                "grid": grid,
                "asha": asha,
                "steps_ratio": asha["steps_spent"] / grid["steps_spent"],
                "best_gap": asha["best"] / grid["best"] - 1,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
