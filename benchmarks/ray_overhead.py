"""Ray Train's overhead: the same short job through one Ray Train worker and in-process.

Both run `ftservice train` on the quickstart spec for N steps with no evaluation, with the
same 2 threads. "In-process" is Ray Train's local mode (`scaling.num_workers: 0`): the same
recipe, the same SFTTrainer and callbacks, run in the driver process with no worker actor,
no controller and no checkpoint upload. Both start the embedded Ray; what differs is the
work Ray Train adds (worker group start-up, process group, reporting and checkpoint
registration). Prints JSON: wall seconds of each whole command and of its training loop.

    .venv/bin/python benchmarks/ray_overhead.py [--steps 30]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import json_output

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "cluster/jobs/quickstart.yaml"


def run(workers: int, steps: int, tmp: Path) -> dict:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "ftservice", "train", str(SPEC), "--no-evaluate", "--json",
        "--max-steps", str(steps), f"scaling.num_workers={workers}", f"name=w{workers}",
        f"output.registry={tmp / 'artifacts'}", f"output.storage_path={tmp / 'runs'}",
        "data.replay=null", "train.kl_to_base=0",  # the SFT alone, as measured before
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    artifact = Path(json_output(done.stdout)["artifact"])
    history = json.loads((artifact / "log_history.json").read_text())
    loop = next(h["train_runtime"] for h in history if "train_runtime" in h)
    return {"wall_s": wall, "train_loop_s": loop, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftb-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        in_process = run(0, args.steps, tmp)
        ray_train = run(1, args.steps, tmp)
    print(
        json.dumps(
            {
                "ray_train_1_worker": ray_train,
                "in_process": in_process,
                "wall_ratio": ray_train["wall_s"] / in_process["wall_s"],
                "train_loop_ratio": ray_train["train_loop_s"] / in_process["train_loop_s"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
