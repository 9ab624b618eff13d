"""ASHA against the full grid on the same space and task, in one run.

Runs the shipped sweep (`tune/lora-rank-lr.yaml`, or another) twice on the embedded Ray:
once with its ASHA scheduler, once with no early stopping (FIFO: every trial to the end).
Prints training steps spent (the last step each trial reached, summed) and the best metric
each found. Goal: ASHA within 2% of the grid's best with at most 40% of its steps.

One ASHA run is one order of the trials, and asynchronous schedulers depend on that order.
So the grid's recorded curves are also replayed, in many random orders, with the same number
of trials at once and each report at the time it took in the grid run, through our ASHA
(`ftservice/asha.py`: trials wait at rungs and the best are promoted; each new start of a
trial's Train run costs the start-up time its first report took) and through Ray's own
`ASHAScheduler` (the stopping variant, for comparison): the distribution of steps spent and
best metric found, without training anything again.

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
    print(done.stdout[-4000:], file=sys.stderr)  # the end of the sweep's live table
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


def grid_trials(root: Path, metric: str) -> list[dict]:
    """Each grid trial's reports: (step, metric, seconds since the trial started)."""
    trials = []
    for result in sorted((root / "tune").glob("*/result.json")):
        rows = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        reports = [(r["step"], r[metric], r["time_total_s"]) for r in rows
                   if metric in r and "step" in r and not r.get("finished")]  # fmt: skip
        params = json.loads((result.parent / "params.json").read_text())
        params = {k: v for k, v in params.items() if not k.startswith("__")}
        trials.append({"id": result.parent.name, "params": params, "reports": reports})
    return trials


def replay(
    trials: list[dict], order: list[int], spec: dict, slots: int
) -> tuple[int, float, float]:
    """Ray's ASHAScheduler over recorded curves: steps spent, best final metric, and the
    seconds the trials took (Ray's and Tune's own start not counted)."""
    import heapq
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    s = spec["scheduler"]
    asha = ASHAScheduler(
        time_attr="training_iteration", metric=s["metric"], mode=s["mode"],
        grace_period=s["grace_period"], reduction_factor=s["reduction_factor"],
    )  # fmt: skip
    sign = 1 if s["mode"] == "min" else -1
    queue, events, steps, finals, now = list(order), [], 0, [], 0.0

    def start(i: int, now: float) -> None:
        asha.on_trial_add(None, SimpleNamespace(trial_id=str(i)))
        heapq.heappush(events, (now + trials[i]["reports"][0][2], i, 0))

    for _ in range(slots):
        if queue:
            start(queue.pop(0), 0.0)
    while events:
        now, i, k = heapq.heappop(events)
        reports = trials[i]["reports"]
        step, value, _ = reports[k]
        result = {"training_iteration": k + 1, s["metric"]: value}
        action = asha.on_trial_result(None, SimpleNamespace(trial_id=str(i)), result)
        if action == TrialScheduler.STOP or k + 1 == len(reports):
            steps += step
            if k + 1 == len(reports):
                finals.append(sign * min(sign * v for _, v, _ in reports))
            if queue:
                start(queue.pop(0), now)
        else:
            heapq.heappush(events, (now + reports[k + 1][2] - reports[k][2], i, k + 1))
    return steps, sign * min(sign * v for v in finals), now


def replay_promoting(
    trials: list[dict], order: list[int], spec: dict, slots: int
) -> tuple[int, float, float]:
    """Our PromotingASHA over recorded curves, driven as Tune drives it: steps spent, best
    final metric, and the seconds the trials took."""
    import heapq
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from ftservice.asha import RUNG, PromotingASHA, rung_steps

    s = spec["scheduler"]
    every = spec["overrides"]["eval.every_steps"]
    asha = PromotingASHA(rung_steps(s["grace_period"], s["reduction_factor"], every),
                         s["reduction_factor"], slots, None)  # fmt: skip
    asha.set_search_properties(s["metric"], s["mode"])
    queue, added, events, now = list(order), [], [], 0.0
    sign = 1 if s["mode"] == "min" else -1
    reached: dict[int, int] = {}  # trial -> last report index reached
    finals: list[float] = []

    class Controller:
        search_alg = SimpleNamespace(is_finished=lambda: not queue, total_samples=len(order))

        def get_trials(self):
            return added

        def pause_trial(self, trial, should_checkpoint=True):
            trial.status = Trial.PAUSED

        def stop_trial(self, trial):
            trial.status = Trial.TERMINATED
            asha.on_trial_remove(self, trial)

        def _set_trial_status(self, trial, status):
            trial.status = status

    ctrl = Controller()

    def launch(trial, now: float) -> None:
        """A (re)start of the trial's Train run: start-up, then training to its next report."""
        i, k = trial.index, reached.get(trial.index, -1) + 1
        reports = trials[i]["reports"]
        startup = reports[0][2] - (reports[1][2] - reports[0][2])
        took = reports[k][2] - (reports[k - 1][2] if k else 0.0)
        trial.status = Trial.RUNNING
        heapq.heappush(events, (now + (startup if k else 0.0) + took, i, k, trial))

    def fill(now: float) -> None:
        while True:
            pick = asha.choose_trial_to_run(ctrl)
            if pick is not None:
                launch(pick, now)
            elif queue and asha.gate():
                trial = SimpleNamespace(trial_id=str(queue[0]), index=queue.pop(0),
                                        status=Trial.PENDING)  # fmt: skip
                added.append(trial)
                asha.on_trial_add(ctrl, trial)
                launch(trial, now)
            else:
                return

    fill(0.0)
    while events:
        now, i, k, trial = heapq.heappop(events)
        reached[i] = k
        step, value, _ = trials[i]["reports"][k]
        last = k + 1 == len(trials[i]["reports"])
        if last:
            trial.status = Trial.TERMINATED
            asha.on_trial_complete(ctrl, trial, {})
            finals.append(value)
        elif step in asha.rungs:
            if asha.on_trial_result(ctrl, trial, {s["metric"]: value, RUNG: step}) == "CONTINUE":
                launch(trial, now)  # promoted at once: its function starts the next segment
        else:
            reports = trials[i]["reports"]
            heapq.heappush(events, (now + reports[k + 1][2] - reports[k][2], i, k + 1, trial))
            continue
        fill(now)
    steps = sum(trials[i]["reports"][k][0] for i, k in reached.items())
    return steps, sign * min(sign * v for v in finals), now


def tunes_grid_order(trials: list[dict], spec: dict) -> list[int]:
    """The trials in the order Tune's own grid search would have run them."""
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    space = {k: tune.grid_search(v["grid"]) for k, v in spec["space"].items() if "grid" in v}
    order = []
    for resolved, _ in generate_variants(space):
        point = {path[0]: value for path, value in resolved.items()}
        order.append(next(i for i, t in enumerate(trials)
                          if all(t["params"][k] == v for k, v in point.items())))  # fmt: skip
    return order


def replays(root: Path, spec: dict, slots: int, replay=replay, orders: int = 500) -> dict:
    import random

    import numpy as np

    trials = grid_trials(root, spec["scheduler"]["metric"])
    total = sum(t["reports"][-1][0] for t in trials)
    sign = 1 if spec["scheduler"]["mode"] == "min" else -1
    best = sign * min(sign * v for t in trials for _, v, _ in t["reports"])
    rng = random.Random(0)
    ratios, gaps, walls = [], [], []
    for _ in range(orders):
        order = rng.sample(range(len(trials)), len(trials))
        steps, found, wall = replay(trials, order, spec, slots)
        ratios.append(steps / total)
        gaps.append(sign * (found / best - 1))
        walls.append(wall)
    ours = replay(trials, list(range(len(trials))), spec, slots)  # the run's seeded order
    tune_order = replay(trials, tunes_grid_order(trials, spec), spec, slots)
    ratios, gaps = np.array(ratios), np.array(gaps)
    return {
        "orders": orders,
        "steps_ratio_mean": float(ratios.mean()),
        "steps_ratio_p10_p50_p90": [float(x) for x in np.percentile(ratios, [10, 50, 90])],
        "best_gap_mean": float(gaps.mean()),
        "share_within_2pct": float((gaps <= 0.02).mean()),
        "share_meeting_goal": float(((gaps <= 0.02) & (ratios <= 0.40)).mean()),
        "trial_seconds_p10_p50_p90": [float(x) for x in np.percentile(walls, [10, 50, 90])],
        "in_the_runs_order": {
            "steps_ratio": ours[0] / total,
            "best_gap": sign * (ours[1] / best - 1),
            "trial_seconds": ours[2],
        },
        "in_tunes_grid_order": {
            "steps_ratio": tune_order[0] / total,
            "best_gap": sign * (tune_order[1] / best - 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default="tune/lora-rank-lr.yaml")
    parser.add_argument("--slots", type=int, default=2, help="Trials at once (as in the runs).")
    parser.add_argument("--out", help="Keep the sweeps here (default: a temporary folder).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftb-", dir="/tmp") as tmp:
        tmp = Path(args.out or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        grid = run(REPO / args.sweep, "fifo", tmp)
        asha = run(REPO / args.sweep, "asha", tmp)
        spec = yaml.safe_load((REPO / args.sweep).read_text())
        spec["name"] += "-fifo"
        replayed = replays(tmp / spec["name"], spec, args.slots, replay_promoting)
        ray_asha = replays(tmp / spec["name"], spec, args.slots, replay)
        by_eta = {}  # our ASHA over the grid's curves with other reduction factors
        for eta in (2, 3, 4):
            other = json.loads(json.dumps(spec))
            other["scheduler"]["reduction_factor"] = eta
            one = replays(tmp / spec["name"], other, args.slots, replay_promoting, orders=50)
            by_eta[eta] = {k: one[k] for k in ("steps_ratio_mean", "best_gap_mean")}
    print(
        json.dumps(
            {
                "grid": grid,
                "asha": asha,
                "steps_ratio": asha["steps_spent"] / grid["steps_spent"],
                "best_gap": asha["best"] / grid["best"] - 1,
                "asha_replayed_in_random_orders": replayed,
                "rays_stopping_asha_replayed": ray_asha,
                "asha_replayed_by_reduction_factor": by_eta,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
