"""Sweeps on a real local Ray Tune over real Ray Train trials of a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftservice.config import SpecError
from ftservice.sweep import SweepError, load_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base_spec(tmp_path, tiny_llama) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    train = (REPO / "data/domain/train.jsonl").read_text().splitlines()[:32]
    (data / "train.jsonl").write_text("\n".join(train) + "\n")
    held = (REPO / "data/domain/eval.jsonl").read_text().splitlines()[:8]
    (data / "eval.jsonl").write_text("\n".join(held) + "\n")
    spec = {
        "name": "tiny",
        "model": {"name": str(tiny_llama)},
        "data": {"train": [str(data / "train.jsonl")], "eval": [str(data / "eval.jsonl")],
                 "max_seq_length": 96},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 12, "micro_batch_size": 8, "warmup_ratio": 0,
                  "precision": "fp32"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": 3, "num_to_keep": 1},
        "eval": {"every_steps": 3, "domain": None, "general": None},
    }  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def ftservice(env: dict, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with its own HOME and local Ray (cli_env)."""
    return subprocess.run(
        [sys.executable, "-m", "ftservice", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=1200,
    )  # fmt: skip


def write_sweep(tmp_path: Path, base: Path, space: dict, **extra) -> Path:
    sweep = {
        "name": "tiny-sweep",
        "base": str(base),
        "space": space,
        "scheduler": {"type": "asha", "metric": "eval_loss", "mode": "min",
                      "grace_period": 1, "reduction_factor": 2},
        "max_concurrent": 2,
        "output_dir": str(tmp_path / "sweeps"),
        **extra,
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_invalid_spaces_are_refused_before_anything_starts(tmp_path, base_spec):
    bad_field = write_sweep(tmp_path, base_spec, {"lora.rank": {"grid": [4, 8]}})
    with pytest.raises(SweepError, match=r"space\.lora\.rank: value 4 is not valid"):
        load_sweep(str(bad_field))
    bad_rank = write_sweep(tmp_path, base_spec, {"lora.r": {"grid": [0, 8]}})
    with pytest.raises(SweepError, match=r"space\.lora\.r: value 0 is not valid.*greater than"):
        load_sweep(str(bad_rank))
    two_kinds = write_sweep(
        tmp_path, base_spec, {"train.learning_rate": {"grid": [1e-3], "loguniform": [1e-4, 1e-3]}}
    )
    with pytest.raises(SpecError) as e:  # the sweep file's own field, with its line
        load_sweep(str(two_kinds))
    [msg] = [p.render(str(two_kinds)) for p in e.value.problems]
    assert msg.startswith(f"{two_kinds}:") and "space.train.learning_rate" in msg
    assert "exactly one of grid" in msg
    orphan = write_sweep(tmp_path, base_spec, {"lora.alpha": {"multiple_of": "lora.r"}})
    with pytest.raises(SweepError) as e:
        load_sweep(str(orphan))
    msg = str(e.value)
    assert f"{orphan}: space.lora.alpha: " in msg and "multiple_of" in msg and "'lora.r'" in msg
    no_eval = write_sweep(tmp_path, base_spec, {"lora.r": {"grid": [2, 4]}},
                          overrides={"data.eval": []})  # fmt: skip
    with pytest.raises(SweepError) as e:
        load_sweep(str(no_eval))
    msg = str(e.value)
    assert f"{no_eval}: scheduler: " in msg, msg
    assert "data.eval" in msg and "eval.every_steps" in msg and "fifo" in msg, msg
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_a_sweep_halves_the_trials_marks_nan_resumes_after_a_kill_and_reports(
    tmp_path, base_spec, cli_env
):
    import time

    from conftest import _kill_session

    held_out = tmp_path / "data" / "held-out.jsonl"  # reported for the best trial only
    valid = (REPO / "data/domain/valid.jsonl").read_text().splitlines(keepends=True)
    held_out.write_text("".join(valid[:4]))
    sweep = write_sweep(
        tmp_path, base_spec,
        {"lora.r": {"grid": [2, 4]}, "lora.alpha": {"multiple_of": "lora.r", "factor": 2},
         "train.learning_rate": {"grid": [3e-3, 1e-3, 1e30]}},
        overrides={"eval.domain": str(held_out), "eval.max_new_tokens": 4},
    )  # fmt: skip
    root = tmp_path / "sweeps" / "tiny-sweep"
    state = root / "asha.json"

    def waiting() -> dict:
        return json.loads(state.read_text())["waiting"] if state.is_file() else {}

    # kill the sweep's driver (and its Ray) while a trial waits at a rung, then resume
    cmd = [sys.executable, "-m", "ftservice", "sweep", str(sweep)]
    first = subprocess.Popen(
        cmd, env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not waiting():
        assert first.poll() is None and time.monotonic() < deadline, "no trial reached a rung"
        time.sleep(0.5)
    _kill_session(first.pid)
    first.wait(timeout=60)
    again = ftservice(cli_env, "sweep", str(sweep), "--resume")
    assert again.returncode == 0, again.stderr[-4000:]

    report = ftservice(cli_env, "sweep", "report", str(root), "--json")
    assert report.returncode == 0, report.stderr[-3000:]
    summary = json.loads(report.stdout[report.stdout.index("{\n") :])
    trials = summary["trials"]
    assert len(trials) == 6
    combos = {(t["params"]["lora.r"], t["params"]["train.learning_rate"]) for t in trials}
    assert len(combos) == 6  # every grid point once
    # the absurd learning rate diverged, and was marked so, in both of its trials
    diverged = [t for t in trials if t["params"]["train.learning_rate"] == 1e30]
    assert [t["state"] for t in diverged] == ["diverged", "diverged"]
    # successive halving (η = 2) of the other 4: all 4 to step 3 (a report every 3 steps),
    # the best 2 on to step 6, the best of those to the end (step 12). Nothing was trained
    # twice: each trial's reports are at distinct steps, so none restarted from scratch or
    # went past a rung it waited at, before or after the kill
    halved = [t for t in trials if t not in diverged]
    assert sorted(t["state"] for t in halved) == ["completed"] + ["stopped early"] * 3
    assert sorted(t["reports"] for t in halved) == [1, 1, 2, 4]
    for t in halved:
        steps = [s for s, _ in t["curve"]]
        assert steps == sorted(set(steps)) and steps[0] == 3, t

    # and the right ones went on: the 2 lowest eval losses at step 3, then the lower at step 6
    def at(t, step):
        return dict((s, v) for s, v in t["curve"])[step]

    by_3 = sorted(halved, key=lambda t: at(t, 3))
    assert sorted(t["reports"] for t in by_3[:2]) == [2, 4], [
        (at(t, 3), t["reports"]) for t in by_3
    ]
    by_6 = sorted(by_3[:2], key=lambda t: at(t, 6))
    assert by_6[0]["state"] == "completed", [(at(t, 6), t["state"]) for t in by_6]
    # ranked by the metric, best first, and the best is the finished trial, with an artifact
    bests = [t["best"] for t in trials if t["best"] is not None]
    assert bests == sorted(bests)
    assert summary["best"]["best"] == bests[0] and summary["best"]["state"] == "completed"
    assert summary["best"]["params"]["train.learning_rate"] == 3e-3
    artifacts = [json.loads(p.read_text()) for p in (root / "artifacts").glob("*/ftservice.json")]
    assert [m["metrics"]["global_step"] for m in artifacts] == [12]
    # the held-out set reports the selected trial, and only it: its artifact carries the
    # evaluation, on the 4 held-out questions
    [best_meta] = artifacts
    assert best_meta["metrics"]["evaluation"]["domain"]["total"] == 4
    assert summary["held_out"] == best_meta["metrics"]["evaluation"]
    # checkpoints of trials that stopped early or diverged are pruned
    for t in trials:
        runs = list((root / "runs").glob(f"tiny-sweep-{t['trial']}-*".replace("_", "-")))
        kept = [c for r in runs for c in r.glob("checkpoint_*") if c.is_dir()]
        if t["state"] in ("stopped early", "diverged"):
            assert kept == [], t
    for png in ("heatmap.png", "curves.png"):
        assert (root / png).read_bytes()[:4] == b"\x89PNG"
    table = ftservice(
        cli_env, "sweep", "report", str(root), "--promote", str(tmp_path / "registry")
    )
    assert table.returncode == 0, table.stderr[-3000:]
    assert "held out (the best trial only; trials were selected on eval_loss)" in table.stdout
    assert "of 4 held-out questions" in table.stdout
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("RANK"))
    assert lines[header + 1].split()[:2] == ["1", summary["best"]["trial"]]  # best first
    promoted = next((tmp_path / "registry").glob("*/ftservice.json"))
    lineage = json.loads(promoted.read_text())["lineage"]
    assert lineage["sweep"] == "tiny-sweep" and lineage["trial"] == summary["best"]["trial"]


@pytest.mark.slow
def test_a_crashing_trial_is_marked_errored_with_its_reason_and_the_others_go_on(
    tmp_path, base_spec, cli_env
):
    sweep = write_sweep(
        tmp_path, base_spec,
        {"lora.target_modules": {"grid": [["q_proj", "v_proj"], ["q_proj"], ["no_such_proj"]]}},
        overrides={"train.max_steps": 3},
        keep_artifacts="best",
    )  # fmt: skip
    done = ftservice(cli_env, "sweep", str(sweep))
    assert done.returncode == 0, done.stderr[-4000:]
    root = tmp_path / "sweeps" / "tiny-sweep"
    summary = json.loads((root / "sweep.json").read_text())
    by_target = {tuple(t["params"]["lora.target_modules"]): t for t in summary["trials"]}
    assert by_target[("q_proj", "v_proj")]["state"] == "completed"
    assert by_target[("q_proj",)]["state"] == "completed"
    # keep_artifacts: best leaves the best completed trial's artifact only
    kept = [p.parent for p in (root / "artifacts").glob("*/ftservice.json")]
    assert [str(p) for p in kept] == [summary["best"]["artifact"]]
    crashed = by_target[("no_such_proj",)]
    assert crashed["state"] == "errored"
    assert "no_such_proj" in crashed["error"]


def test_tpe_samples_every_dimension_and_grid_repeats_the_grid(tmp_path, base_spec):
    from ray.tune.search.sample import Categorical, Float

    from ftservice.sweep import param_space

    path = write_sweep(
        tmp_path, base_spec,
        {"lora.r": {"grid": [2, 4]}, "train.learning_rate": {"loguniform": [1e-4, 1e-2]}},
        search={"algorithm": "tpe", "num_samples": 6},
    )  # fmt: skip
    sweep, _ = load_sweep(str(path))
    space = param_space(sweep)
    assert isinstance(space["lora.r"], Categorical) and space["lora.r"].categories == [2, 4]
    assert isinstance(space["train.learning_rate"], Float)
    grid, _ = load_sweep(str(write_sweep(tmp_path, base_spec, {"lora.r": {"grid": [2, 4]}})))
    assert param_space(grid)["lora.r"] == {"grid_search": [2, 4]}


def test_the_grid_runs_every_point_once_per_sample_in_a_seeded_random_order(tmp_path, base_spec):
    import itertools

    from ftservice.sweep import grid_points

    space = {"lora.r": {"grid": [2, 4, 8]}, "train.learning_rate": {"grid": [1e-4, 1e-3, 1e-2]},
             "lora.dropout": {"uniform": [0.0, 0.1]}}  # fmt: skip
    sweep, _ = load_sweep(str(write_sweep(tmp_path, base_spec, space, search={"num_samples": 2})))
    points = grid_points(sweep)
    product = [{"lora.r": r, "train.learning_rate": lr}
               for r, lr in itertools.product([2, 4, 8], [1e-4, 1e-3, 1e-2])]  # fmt: skip
    first, second = points[:9], points[9:]
    key = lambda p: (p["lora.r"], p["train.learning_rate"])  # noqa: E731
    assert sorted(first, key=key) == product and sorted(second, key=key) == product
    # not the fixed order, in which each later trial tends to beat the earlier ones
    assert first != product and first != second
    assert grid_points(sweep) == points  # the same seed gives the same order (resume)


def test_the_shipped_sweep_is_valid():
    sweep, base = load_sweep(str(REPO / "tune/lora-rank-lr.yaml"))
    assert sweep.scheduler.type == "asha"
    # it selects on the validation phrasings; the held-out ones are only reported
    assert base["data"]["eval"] == ["data/domain/valid.jsonl"]
    assert {k for k in sweep.space} == {"train.learning_rate", "lora.r", "lora.alpha"}


@pytest.mark.slow
def test_the_time_budget_stops_the_sweep_and_keeps_what_ran(tmp_path, base_spec, cli_env):
    # 100,000 steps cannot end inside a budget of 60 s: the trial running then is stopped by
    # the budget, and none completes (TPE suggests the trials, through ASHA's gate); 60 s and
    # not less, so that a trial has started on a busy machine before the budget ends
    sweep = write_sweep(
        tmp_path, base_spec, {"train.learning_rate": {"loguniform": [3e-4, 3e-3]}},
        search={"algorithm": "tpe", "num_samples": 3},
        overrides={"train.max_steps": 100_000}, time_budget_minutes=1, max_concurrent=1,
    )  # fmt: skip
    done = ftservice(cli_env, "sweep", str(sweep))
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "sweeps" / "tiny-sweep" / "sweep.json").read_text())
    states = [t["state"] for t in summary["trials"]]
    assert "stopped early" in states, states  # the budget stopped the one that ran
    assert set(states) <= {"stopped early", "not started"}, states


def test_a_sweep_spec_error_names_the_file_the_field_and_the_line(tmp_path, base_spec):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"name: s\nbase: {base_spec}\nspace:\n  lora.r: {{grid: [4, 8]}}\nscheduler:\n  typ: asha\n"
    )
    with pytest.raises(SpecError) as e:
        load_sweep(str(path))
    [msg] = [p.render(str(path)) for p in e.value.problems]
    assert msg.startswith(f"{path}:6: scheduler.typ: unknown key 'typ'; did you mean 'type'?")
    path.write_text("name: s\nspace: [\n  lora.r\n")
    with pytest.raises(SpecError) as e:
        load_sweep(str(path))
    assert f"{path}:" in str(e.value) and "not valid YAML" in str(e.value)


def test_a_sweep_that_selects_on_the_held_out_domain_set_is_refused(tmp_path, base_spec):
    spec = yaml.safe_load(base_spec.read_text())
    held_out = spec["data"]["eval"][0]
    spec["eval"]["domain"] = held_out  # the base reports its domain score on the eval file
    base_spec.write_text(yaml.safe_dump(spec))
    # the sweep leaves domain scoring out of its trials, but still ranks them on that file
    path = write_sweep(tmp_path, base_spec, {"lora.r": {"grid": [2, 4]}},
                       overrides={"eval.domain": None})  # fmt: skip
    with pytest.raises(SpecError) as e:
        load_sweep(str(path))
    [msg] = [p.render(str(path)) for p in e.value.problems]
    assert msg.startswith(f"{path}:")
    assert "data.eval" in msg and held_out in msg and "held-out domain set" in msg
    allowed = write_sweep(tmp_path, base_spec, {"lora.r": {"grid": [2, 4]}},
                          overrides={"eval.domain": None,
                                     "eval.allow_selection_on_domain": True})  # fmt: skip
    assert load_sweep(str(allowed))[1]["data"]["eval"] == [held_out]


def test_a_trial_is_tracked_in_the_sweeps_experiment_with_its_trial_tag(tmp_path, base_spec):
    from ftservice.sweep import trial_spec

    sweep, base = load_sweep(str(write_sweep(tmp_path, base_spec, {"lora.r": {"grid": [2, 4]}})))
    spec = trial_spec(base, sweep, {"lora.r": 2}, "abc_00001", tmp_path / "sw")
    assert spec.lora.r == 2 and spec.tracking.experiment == "tiny-sweep"
    assert spec.tracking.tags == {"ftservice.sweep": "tiny-sweep", "ftservice.trial": "abc_00001"}


@pytest.mark.slow
def test_a_forgetting_sweep_picks_the_least_drift_near_the_best_score_and_draws_the_front(
    tmp_path, base_spec, cli_env, builtin_model
):
    from conftest import make_tiny_llama

    # a tiny model whose answers are words, so that its drift on the prompts is measurable
    chatty = make_tiny_llama(tmp_path / "chatty", builtin_model.path, initializer_range=0.1)
    spec = yaml.safe_load(base_spec.read_text())
    spec["model"]["name"] = str(chatty)
    base_spec.write_text(yaml.safe_dump(spec))
    general = tmp_path / "data" / "general.jsonl"
    lines = (REPO / "data/general/valid.jsonl").read_text().splitlines()[:6]
    general.write_text("\n".join(lines) + "\n")
    domain = REPO / "data/domain/valid.jsonl"
    sweep = write_sweep(
        tmp_path, base_spec, {"train.learning_rate": {"grid": [1e-4, 3e-3, 3e-2]}},
        overrides={"data.eval": [], "eval.every_steps": None},
        scheduler={"type": "fifo", "metric": "valid_domain_score", "mode": "max"},
        trial_eval={"domain": str(domain), "general": str(general), "limit": 4},
        selection={"rule": "least_drift", "tolerance": 0.5}, max_concurrent=1,
    )  # fmt: skip
    done = ftservice(cli_env, "sweep", str(sweep))
    assert done.returncode == 0, done.stderr[-4000:]
    root = tmp_path / "sweeps" / "tiny-sweep"
    summary = json.loads((root / "sweep.json").read_text())
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["completed"] * 3
    scores = {t["trial"]: t["validation"]["valid_domain_score"] for t in trials}
    drift = {t["trial"]: t["validation"]["valid_kl"] for t in trials}
    assert len(set(drift.values())) == 3 and min(drift.values()) > 0  # each drifted its own
    near = [t for t in scores if scores[t] >= max(scores.values()) - 0.5]
    assert summary["best"]["trial"] == min(near, key=drift.get)
    assert "least drift within 50 points" in summary["selection"]
    assert (root / "pareto.png").stat().st_size > 10_000
    report = ftservice(cli_env, "sweep", "report", str(root))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "chosen: least drift" in report.stdout and "VALID_KL" in report.stdout


def test_a_forgetting_sweep_is_refused_without_its_validation_sets(tmp_path, base_spec):
    spec = yaml.safe_load(base_spec.read_text())
    spec["eval"]["domain"] = str(REPO / "data/domain/eval.jsonl")  # the held-out questions
    base_spec.write_text(yaml.safe_dump(spec))
    bare = write_sweep(tmp_path, base_spec, {"lora.r": {"grid": [2, 4]}},
                       selection={"rule": "least_drift"})  # fmt: skip
    with pytest.raises(SpecError) as e:
        load_sweep(str(bare))
    assert "selection.rule" in str(e.value) and "trial_eval" in str(e.value)
    held_out = write_sweep(
        tmp_path, base_spec, {"lora.r": {"grid": [2, 4]}},
        trial_eval={"domain": str(REPO / "data/domain/eval.jsonl"),
                    "general": str(REPO / "data/general/valid.jsonl")},
    )  # fmt: skip
    with pytest.raises(SpecError) as e:
        load_sweep(str(held_out))
    assert "trial_eval.domain" in str(e.value) and "held-out domain set" in str(e.value)


def test_the_shipped_forgetting_sweep_is_valid():
    sweep, base = load_sweep(str(REPO / "tune/forgetting.yaml"))
    assert sweep.scheduler.type == "fifo" and sweep.selection.rule == "least_drift"
    assert sweep.trial_eval.domain == "data/domain/valid.jsonl"
    assert sweep.trial_eval.general == "data/general/valid.jsonl"
    assert set(sweep.space) == {"data.replay.ratio", "train.kl_to_base"}
    assert base["data"]["replay"]["prompts"] == "data/general/replay.jsonl"
