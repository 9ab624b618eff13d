"""Hyperparameter sweeps on Ray Tune over the same Ray Train recipe as `ftservice train`.

A sweep spec (`tune/*.yaml`) names a base job spec, fixed overrides, a search space over
any field of the job spec (checked against the job spec's schema before anything starts),
the search algorithm, the scheduler (ASHA by default) and a budget. Each trial is a Tune
function that runs the training driver for the job spec with its sampled values (Train V2
inside Tune: the workers' reports reach Tune through `TuneReportCallback`), so ASHA stops
bad trials on the metrics the training workers report at every evaluation.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ftservice import storage
from ftservice.artifacts import META, SweepLineage, load_artifact, remove, update_metrics
from ftservice.asha import (
    RUNG,
    AshaState,
    GatedLimiter,
    GatedVariants,
    PromotingASHA,
    promoted_from,
    rung_steps,
)
from ftservice.config import (
    EvalSpec,
    JobSpec,
    Problem,
    Spec,
    SpecError,
    apply_overrides,
    load_spec,
    read_yaml,
    selection_problem,
    spec_from_dict,
    validate_spec,
)
from ftservice.errors import FtserviceError
from ftservice.models import resolve_model
from ftservice.records import Record, Strict
from ftservice.train.driver import TrainingDiverged, evaluate_remote
from ftservice.train.driver import train as run_training
from ftservice.tune_report import MetricFirstReportCallback

RESULTS = "sweep.json"
ASHA_STATE = "asha.json"


class SweepError(FtserviceError):
    exit_code = 2


class Dimension(Spec):
    """One searched field: exactly one of grid, choice, uniform, loguniform, multiple_of."""

    grid: list[Any] | None = Field(None, description="Every value, each in its own trials.")
    choice: list[Any] | None = Field(None, description="Values sampled uniformly.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniform.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], log scale.")
    multiple_of: str | None = Field(
        None, description="Another searched field this one is a multiple of (alpha of r)."
    )
    factor: float = Field(1.0, gt=0, description="The multiple, with multiple_of.")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "multiple_of")
                 if getattr(self, k) is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(
                "give exactly one of grid, choice, uniform, loguniform, multiple_of "
                f"(got {', '.join(given) or 'none'})"
            )
        for name in ("uniform", "loguniform"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: [low, high] needs low < high, got {list(bounds)}")
            if name == "loguniform" and bounds is not None and bounds[0] <= 0:
                raise ValueError("loguniform bounds must be positive")
        return self

    def samples(self) -> list[Any]:
        """Values that stand for the dimension when checking it against the schema."""
        if self.grid is not None:
            return list(self.grid)
        if self.choice is not None:
            return list(self.choice)
        bounds = self.uniform or self.loguniform
        return list(bounds) if bounds else []


class SearchSpec(Spec):
    algorithm: Literal["grid", "random", "tpe"] = Field(
        "grid", description="grid (every grid combination), random, or tpe (Optuna)."
    )
    num_samples: int = Field(
        1, ge=1, description="Samples of the space (grid: repeats of the whole grid)."
    )
    seed: int = Field(0, description="Seed of the searcher.")


class SchedulerSpec(Spec):
    type: Literal["asha", "fifo"] = Field(
        "asha", description="ASHA (trials wait at rungs, the best are promoted), or none."
    )
    metric: str = Field("eval_loss", description="Metric the workers report (eval_ prefix).")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise it.")
    grace_period: int = Field(
        1, ge=1, description="Reports (evaluations) before the first rung; rungs at grace·η^k."
    )
    reduction_factor: float = Field(2, gt=1, description="η: a rung promotes its top 1/η.")


class TrialEvalSpec(Spec):
    domain: str | None = Field(
        None, description="Validation questions: each trial's domain score (never eval.domain)."
    )
    general: str | None = Field(
        None, description="Validation prompts: each trial's drift, KL(base || tuned)."
    )
    limit: int | None = Field(None, ge=1, description="Only the first N of each set.")


class SelectionSpec(Spec):
    rule: Literal["metric", "least_drift"] = Field(
        "metric",
        description="metric: the trial with the best scheduler.metric; least_drift: of the "
        "trials whose validation domain score is within `tolerance` of the best one, the one "
        "that drifts least from its base (needs trial_eval.domain and trial_eval.general).",
    )
    tolerance: float = Field(
        0.02, ge=0, le=1, description="least_drift: domain score below the best still kept."
    )


class SweepSpec(Spec):
    name: str = Field("sweep", pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Sweep name.")
    base: str = Field(description="Job spec the trials start from (path, relative to cwd).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Fixed changes to the base for every trial."
    )
    space: dict[str, Dimension] = Field(
        min_length=1, description="Searched fields of the job spec, by dotted path."
    )
    search: SearchSpec = Field(default_factory=SearchSpec, description="Search algorithm.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Scheduler.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Trials at once; default: what the cluster's CPUs/GPUs allow."
    )
    time_budget_minutes: float | None = Field(
        None, gt=0, description="Total wall-clock budget; trials still running then are stopped."
    )
    output_dir: str = Field("sweeps", description="Where sweeps keep trials and reports.")
    keep_artifacts: Literal["all", "best"] = Field(
        "all", description="Trial artifacts kept once the sweep ends: all, or the best only."
    )
    trial_eval: TrialEvalSpec | None = Field(
        None,
        description="Evaluate every finished trial on validation sets (domain score, drift): "
        "what selection.rule least_drift ranks on, and what pareto.png draws.",
    )
    selection: SelectionSpec = Field(
        default_factory=SelectionSpec, description="How the best trial is chosen."
    )
    evaluate_best: bool = Field(
        True,
        description="Once the sweep ends, evaluate the best trial (selected on data.eval) on "
        "the base job's held-out sets (eval.domain, eval.general); no other trial is.",
    )


def _override(path: str, value: Any) -> str:
    return f"{path}={json.dumps(value)}"


def _selection_problems(sweep: SweepSpec) -> list[Problem]:
    """Trials ranked on the base job's held-out domain set (the file its domain score reports
    on, even when the sweep turns that score off for its trials)."""
    try:
        raw, _ = read_yaml(sweep.base)
    except SpecError:
        return []  # the base's own problems are reported when it is loaded
    merged = json.loads(json.dumps(raw))
    apply_overrides(merged, [_override(k, v) for k, v in sweep.overrides.items()])
    section = merged.get("eval") if isinstance(merged.get("eval"), dict) else {}
    if section.get("allow_selection_on_domain") is True:
        return []
    original = raw.get("eval") if isinstance(raw.get("eval"), dict) else {}
    domain = original.get("domain", EvalSpec().domain)
    selection = (merged.get("data") or {}).get("eval") or []
    field = "overrides.data.eval" if "data.eval" in sweep.overrides else "base"
    found = selection_problem(field, [str(f) for f in selection], domain,
                              "the trials are ranked on data.eval, and ")  # fmt: skip
    problems = [found] if found else []
    te = sweep.trial_eval
    if te is not None and te.domain is not None:
        found = selection_problem("trial_eval.domain", [te.domain], domain,
                                  "the trials are ranked on trial_eval.domain, and ")  # fmt: skip
        problems += [found] if found else []
    return problems


def _rule_problems(sweep: SweepSpec) -> list[Problem]:
    te = sweep.trial_eval
    if sweep.selection.rule == "least_drift" and (te is None or not (te.domain and te.general)):
        return [Problem(
            "selection.rule",
            "least_drift ranks trials on their validation domain score and drift, and "
            "trial_eval does not give both sets; add trial_eval: {domain: "
            "data/domain/valid.jsonl, general: data/general/valid.jsonl}, or rule: metric.",
        )]  # fmt: skip
    return []


def load_sweep(path: str) -> tuple[SweepSpec, dict]:
    """The sweep spec and its base job spec (as a dict), every dimension checked against the
    job spec's schema: a value of each dimension must make a valid job spec. A problem with
    the sweep file itself is a SpecError naming its field and line."""
    data, lines = read_yaml(path, "sweep spec")
    sweep = validate_spec(
        SweepSpec, data, path, lines, None, lambda s: _selection_problems(s) + _rule_problems(s)
    )
    base_spec = load_spec(
        sweep.base, [_override(k, v) for k, v in sweep.overrides.items()], check_inputs=True
    )
    base = base_spec.model_dump(mode="json")
    problems = []
    for key, dim in sweep.space.items():
        if dim.multiple_of is not None:
            if dim.multiple_of not in sweep.space:
                problems.append(f"{path}: space.{key}: multiple_of names '{dim.multiple_of}', "
                                "which is not in the space")  # fmt: skip
            continue
        for value in dim.samples():
            try:
                spec_from_dict(json.loads(json.dumps(base)), path, None, [_override(key, value)])
            except SpecError as e:
                detail = "; ".join(p.message for p in e.problems)
                problems.append(f"{path}: space.{key}: value {value!r} is not valid: {detail}")
                break
    if sweep.scheduler.type == "asha" and not (
        base["data"]["eval"] and base["eval"]["every_steps"]
    ):
        problems.append(
            f"{path}: scheduler: asha compares trials at evaluations, but the base job has no "
            "held-out data or evaluation interval; set data.eval and eval.every_steps in "
            "overrides (or use scheduler.type: fifo)"
        )
    if problems:
        raise SweepError("\n".join(problems))
    return sweep, base


def rungs(sweep: SweepSpec, spec: JobSpec) -> list[int]:
    """The steps at which ASHA's trials wait (none without ASHA)."""

    s = sweep.scheduler
    if s.type != "asha":
        return []
    return rung_steps(s.grace_period, s.reduction_factor, spec.eval.every_steps)


def trial_spec(base: dict, sweep: SweepSpec, config: dict, trial_id: str, root: Path) -> JobSpec:
    """The job spec of one trial: base + sampled values, its own name and storage."""
    values = dict(config)
    for key, dim in sweep.space.items():
        if dim.multiple_of is not None:
            values[key] = values[dim.multiple_of] * dim.factor
    overrides = [_override(k, v) for k, v in values.items()]
    overrides += [
        _override("name", f"{sweep.name}-{trial_id}".lower().replace("_", "-")),
        _override("output.registry", str(root / "artifacts")),
        _override("output.storage_path", str(root / "runs")),
        # trackers: the trials of a sweep are one experiment, each run tagged with its trial
        _override("tracking.experiment", base.get("tracking", {}).get("experiment") or sweep.name),
        _override("tracking.tags", {**base.get("tracking", {}).get("tags", {}),
                                    "ftservice.sweep": sweep.name, "ftservice.trial": trial_id}),
    ]  # fmt: skip
    return spec_from_dict(json.loads(json.dumps(base)), f"trial {trial_id}", None, overrides)


def param_space(sweep: SweepSpec) -> dict:
    from ray import tune

    space = {}
    for key, dim in sweep.space.items():
        if dim.grid is not None and sweep.search.algorithm == "tpe":
            space[key] = tune.choice(dim.grid)  # a model-based searcher samples, never grids
        elif dim.grid is not None:
            space[key] = tune.grid_search(dim.grid)
        elif dim.choice is not None:
            space[key] = tune.choice(dim.choice)
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            space[key] = tune.loguniform(*dim.loguniform)
    return space


def grid_points(sweep: SweepSpec) -> list[dict]:
    """The grid's points in the order the trials run: seeded random, each point once per
    `num_samples`. Tune's own grid order is fixed (keys sorted, the first varying fastest)
    and monotone in each swept value, so every new trial beats the ones before it, and ASHA,
    which never stops the first trial through a rung, stops almost nothing. Like Optuna's
    GridSampler, run the points in random order; non-grid dimensions are sampled per point.
    Grids of lists or mappings (target modules) stay Tune grids inside each point: Tune's
    preset points take scalars only."""
    import itertools
    import random

    scalar = (str, int, float, bool)
    keys = [k for k, d in sweep.space.items()
            if d.grid is not None and all(isinstance(v, scalar) for v in d.grid)]  # fmt: skip
    points = [dict(zip(keys, values, strict=True))
              for values in itertools.product(*(sweep.space[k].grid for k in keys))]  # fmt: skip
    rng = random.Random(sweep.search.seed)
    order = []
    for _ in range(sweep.search.num_samples):
        order += rng.sample(points, len(points))
    return order


def run_trial(config: dict) -> None:
    """The Tune function of one trial: the training driver, reports forwarded to Tune."""
    from ray import tune

    sweep = SweepSpec.model_validate(config.pop("__sweep"))
    base = config.pop("__base")
    root = Path(config.pop("__root"))
    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(base, sweep, config, trial_id, root)
    metric = sweep.scheduler.metric
    report = MetricFirstReportCallback([metric, "step"])  # the live table
    # a metric of the validation after training is in no worker's report, and Tune refuses
    # results without it: then only the trial's final result goes to Tune
    forward = [] if metric in VALIDATION else [report]
    while True:
        done = promoted_from(root / ASHA_STATE, trial_id)
        wait_at = [step for step in rungs(sweep, spec) if step not in done]
        try:
            result = run_training(spec, evaluate=False, callbacks=forward, pause_at=wait_at)
        except TrainingDiverged as e:
            worst = math.inf if sweep.scheduler.mode == "min" else -math.inf
            tune.report({metric: worst, "diverged": True, "diverged_step": e.step})
            return
        if result.paused_at is None:
            break
        # at a rung: ASHA either promotes the trial at once (it trains on from here), or
        # pauses it, which ends this function's actor (it starts afresh on promotion). Tune
        # does not wait for the decision before `report` returns, so wait for it here.
        at = [h for h in result.log_history if h.get("step") == result.paused_at and metric in h]
        value = at[-1][metric] if at else math.nan
        tune.report({metric: value, "step": result.paused_at, RUNG: result.paused_at})
        while result.paused_at not in promoted_from(root / ASHA_STATE, trial_id):
            time.sleep(0.5)
    m = result.artifact.meta.metrics
    final = {metric: m.get("best_" + metric, math.nan)}
    if sweep.trial_eval is not None:
        final |= validate_trial(spec, sweep.trial_eval, result.artifact)
    tune.report(
        final
        | {
            "finished": True,  # not "done": Tune sets that on every trial's last result
            "artifact": result.artifact.location,
            "global_step": m["global_step"],
        }
    )


VALIDATION = ("valid_domain_score", "valid_domain_loss", "valid_kl", "valid_perplexity")


def validate_trial(spec: JobSpec, te: TrialEvalSpec, artifact) -> dict:
    """A finished trial's numbers on the validation sets (as a Ray task, placed as its
    workers were): its domain score and loss, and its drift from the base."""
    eval_spec = spec.model_copy(
        update={"eval": spec.eval.model_copy(update={"domain": te.domain, "general": te.general})}
    )
    ev = evaluate_remote(eval_spec, artifact, resolve_model(spec.model), te.limit)
    out = {}
    if "domain" in ev:
        out |= {"valid_domain_score": ev["domain"]["accuracy"],
                "valid_domain_loss": ev["domain"]["loss"]}  # fmt: skip
    if "forgetting" in ev:
        f = ev["forgetting"]
        out |= {"valid_kl": f["kl_from_base"], "valid_perplexity": f["perplexity_tuned"]}
    return out


def concurrency(base: JobSpec, sweep: SweepSpec) -> int:
    """Trials at once: what the cluster's resources hold of each trial's workers."""
    import ray

    if sweep.max_concurrent:
        return sweep.max_concurrent
    sc = base.scaling
    total = ray.cluster_resources()
    if sc.use_gpu:
        return max(1, int(total.get("GPU", 0) // (sc.num_workers * sc.gpus_per_worker)))
    return max(1, int(total.get("CPU", 1) // (max(sc.num_workers, 1) * sc.cpus_per_worker)))


def run_sweep(path: str, resume: bool = False):
    """Run (or resume) the sweep; returns Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep, base = load_sweep(path)
    root = (Path(sweep.output_dir) / sweep.name).resolve()
    base_spec = JobSpec.model_validate(base)
    s, algorithm = sweep.scheduler, sweep.search.algorithm
    at_once = concurrency(base_spec, sweep)
    num_samples = sweep.search.num_samples
    scheduler = FIFOScheduler()
    variants = {"random_state": sweep.search.seed}
    if algorithm == "grid":
        variants["points_to_evaluate"] = grid_points(sweep)  # each replaces one sample
        num_samples = len(variants["points_to_evaluate"])
    if s.type == "asha":
        # ASHA decides which trial runs next, so it also gates the searcher (asha.py)
        scheduler = PromotingASHA(rungs(sweep, base_spec), s.reduction_factor, at_once,
                                  str(root / ASHA_STATE))  # fmt: skip
        if algorithm == "tpe":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = GatedLimiter(OptunaSearch(seed=sweep.search.seed), scheduler.gate,
                                      max_concurrent=num_samples)  # fmt: skip
        else:
            search_alg = GatedVariants(scheduler.gate, **variants)
        limit = None
    elif algorithm == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, limit = OptunaSearch(seed=sweep.search.seed), at_once
    else:  # Tune applies max_concurrent_trials to Searchers only, not to its generator
        search_alg, limit = BasicVariantGenerator(max_concurrent=at_once, **variants), None
    fixed = {"__sweep": sweep.model_dump(mode="json"), "__base": base, "__root": str(root)}
    # the trial function only drives its Ray Train run, whose workers hold the CPUs/GPUs; a
    # trial must still ask for something, so it asks for a byte of memory
    trainable = tune.with_resources(run_trial, {"CPU": 0, "memory": 1})
    if resume:
        if not tune.Tuner.can_restore(str(root / "tune")):
            raise SweepError(f"no sweep to resume at {root / 'tune'}; run it without --resume")
        tuner = tune.Tuner.restore(
            str(root / "tune"), trainable=trainable, param_space=param_space(sweep) | fixed,
            resume_unfinished=True, resume_errored=False, restart_errored=False,
        )  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep) | fixed,
            tune_config=tune.TuneConfig(
                metric=s.metric,
                mode=s.mode,
                scheduler=scheduler,
                search_alg=search_alg,
                num_samples=num_samples,
                max_concurrent_trials=limit,
                time_budget_s=sweep.time_budget_minutes and sweep.time_budget_minutes * 60,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(root)),
        )
    grid = tuner.fit()
    summary = write_results(root, sweep)
    prune_checkpoints(root, sweep, summary["trials"])
    if sweep.keep_artifacts == "best":
        prune_artifacts(root, summary)
    if sweep.evaluate_best and evaluate_best(summary):
        write_results(root, sweep)  # with the best trial's held-out numbers
    return grid


def best_artifact(best: dict | None):
    """The best trial's artifact, while it exists."""
    if not best or not best["artifact"] or not storage.exists(best["artifact"]):
        return None
    return load_artifact(best["artifact"])


def evaluate_best(summary: dict) -> bool:
    """Evaluate the best trial only on the held-out sets (domain score, forgetting), into its
    artifact's metrics: trials are selected on data.eval, and the held-out sets report the
    one selected. False when there was nothing to do (no artifact or held-out sets, or an
    artifact evaluated already by a sweep now resumed)."""
    artifact = best_artifact(summary.get("best"))
    if artifact is None or "evaluation" in artifact.meta.metrics:
        return False
    job = JobSpec.model_validate(artifact.meta.spec)
    if not (job.eval.domain or job.eval.general):
        return False
    print(f"ftservice sweep: evaluating the best trial {summary['best']['trial']} on the "
          "held-out sets", file=sys.stderr)  # fmt: skip
    evaluation = evaluate_remote(job, artifact, resolve_model(job.model))
    update_metrics(artifact, {"evaluation": evaluation})
    return True


def prune_artifacts(root: Path, summary: dict) -> list[str]:
    """Remove every trial's artifact but the best one's; returns the names removed."""
    best = (summary.get("best") or {}).get("artifact")
    gone = []
    for record in summary["trials"]:
        location = record["artifact"]
        if location and location != best and storage.exists(location):
            name = location.rstrip("/").rsplit("/", 1)[-1]
            remove(name, root / "artifacts", force=True)
            gone.append(name)
    return gone


def prune_checkpoints(root: Path, sweep: SweepSpec, records: list[dict]) -> int:
    """Delete the checkpoints of trials that will never continue (stopped early or
    diverged), once the sweep is over; returns how many folders went."""
    removed = 0
    for record in records:
        if record["state"] not in ("stopped early", "diverged"):
            continue
        prefix = f"{sweep.name}-{record['trial']}".lower().replace("_", "-")
        for run in (root / "runs").glob(f"{prefix}-*"):
            for checkpoint in run.glob("checkpoint_*"):
                if checkpoint.is_dir():  # not Ray's checkpoint_manager_snapshot.json
                    shutil.rmtree(checkpoint, ignore_errors=True)
                    removed += 1
    return removed


def tune_trials(root: Path) -> dict[str, Any]:
    """Tune's own record of the sweep's trials (`ExperimentAnalysis` over its experiment
    state), by trial folder. Empty before Tune has written any state."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(root / "tune"))
    except (ValueError, FileNotFoundError):
        return {}
    return {Path(t.path).name: t for t in analysis.trials}


def trial_records(root: Path, sweep: SweepSpec) -> list[dict]:
    """Every trial of the sweep: Tune's trials (id, state) with their params, reported
    results and ASHA's rung values; the best metric of each."""
    metric, mode = sweep.scheduler.metric, sweep.scheduler.mode
    # ASHA's own record of every rung value, written at each decision: Tune's result files
    # lose their last rows when the sweep's driver is killed
    at_rungs: dict[str, dict[int, float]] = {}
    if (root / ASHA_STATE).is_file():
        state = AshaState.read(root / ASHA_STATE)
        for step, values in zip(state.rungs, state.recorded, strict=True):
            for tid, v in values.items():
                at_rungs.setdefault(tid, {})[step] = v
    known = tune_trials(root)
    records = []
    for params_file in sorted((root / "tune").glob("*/params.json")):
        trial_dir = params_file.parent
        rows = []
        result_file = trial_dir / "result.json"
        if result_file.is_file():
            rows = [json.loads(x) for x in result_file.read_text().splitlines() if x.strip()]
        trial = known.get(trial_dir.name)
        # a trial Tune's state does not hold yet (its driver was killed before the next
        # snapshot) still names itself in every result it reported
        trial_id = trial.trial_id if trial else rows[0]["trial_id"] if rows else None
        if trial_id is None:
            continue  # created and killed before its first result: nothing to show
        params = {k: v for k, v in json.loads(params_file.read_text()).items()
                  if not k.startswith("__")}  # fmt: skip
        reported = {(r.get("global_step") or r.get("step") or r["training_iteration"]): r[metric]
                    for r in rows
                    if metric in r and not (r.get("finished") or r.get(RUNG))}  # fmt: skip
        curve = sorted((at_rungs.get(trial_id, {}) | reported).items())
        values = [v for _, v in curve if isinstance(v, (int, float)) and math.isfinite(v)]
        if not values:  # a trial restarted after its end: only the final summary is left
            values = [r[metric] for r in rows if r.get("finished") and math.isfinite(r[metric])]
        best = (min(values) if mode == "min" else max(values)) if values else None
        last = rows[-1] if rows else {}
        error = trial_dir / "error.txt"
        if any(r.get("diverged") for r in rows):
            state = "diverged"
        elif any(r.get("finished") for r in rows):
            state = "completed"
        elif error.is_file() or (trial is not None and trial.status == "ERROR"):
            state = "errored"
        else:
            state = "stopped early" if rows or curve else "not started"
        finished = next((r for r in rows if r.get("finished")), {})
        validation = {k: finished[k] for k in VALIDATION if k in finished}
        records.append(
            {
                "trial": trial_id,
                "params": params,
                "state": state,
                "validation": validation or None,
                "best": best,
                "reports": len(curve),
                "curve": curve,
                "artifact": last.get("artifact"),
                "error": error.read_text()[-500:] if error.is_file() else None,
            }
        )
    sign = 1 if mode == "min" else -1
    records.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0)))
    return records


class TrialRecord(Strict):
    trial: str
    params: dict[str, Any]
    state: Literal["completed", "diverged", "errored", "stopped early", "not started"]
    best: float | None
    reports: int
    curve: list[tuple[int, float | str | None]]
    artifact: str | None
    error: str | None
    validation: dict[str, float] | None = None


class SweepSummary(Record):
    """`sweep.json`: the ranked trials of a sweep, what `sweep report` and promote read."""

    format_version: int = 1
    sweep: str
    metric: str
    mode: Literal["min", "max"]
    trials: list[TrialRecord]
    best: TrialRecord | None
    # the best trial's evaluation on the held-out sets (the only trial evaluated on them)
    held_out: dict[str, Any] | None = None
    selection: str | None = None
    """How the best trial was chosen, in words."""


def least_drift(records: list[dict], tolerance: float) -> tuple[dict | None, str]:
    """Of the trials whose validation domain score is within `tolerance` of the best one,
    the one with the least KL to its base (ties: the higher score)."""
    done = [r for r in records if r["validation"] and "valid_kl" in r["validation"]
            and "valid_domain_score" in r["validation"]]  # fmt: skip
    if not done:
        return None, "no trial has validation numbers"
    top = max(r["validation"]["valid_domain_score"] for r in done)
    near = [r for r in done if r["validation"]["valid_domain_score"] >= top - tolerance - 1e-9]
    best = min(near, key=lambda r: (r["validation"]["valid_kl"],
                                    -r["validation"]["valid_domain_score"]))  # fmt: skip
    v = best["validation"]
    return best, (
        f"least drift within {tolerance * 100:g} points of the best validation domain score "
        f"({top:.1%}): trial {best['trial']}, {v['valid_domain_score']:.1%} at KL "
        f"{v['valid_kl']:.3f} ({len(near)} of {len(done)} trials within reach)"
    )


def pareto_front(records: list[dict]) -> list[dict]:
    """The trials no other trial beats on both validation domain score (higher) and KL
    (lower), by KL."""
    done = [r for r in records if r["validation"] and "valid_kl" in r["validation"]
            and "valid_domain_score" in r["validation"]]  # fmt: skip

    def point(r):
        return r["validation"]["valid_kl"], r["validation"]["valid_domain_score"]

    front = [r for r in done if not any(
        point(o)[0] <= point(r)[0] and point(o)[1] >= point(r)[1] and point(o) != point(r)
        for o in done)]  # fmt: skip
    return sorted(front, key=point)


def write_results(root: Path, sweep: SweepSpec) -> dict:
    records = trial_records(root, sweep)
    best = records[0] if records and records[0]["best"] is not None else None
    selection = f"best {sweep.scheduler.metric}" if best else None
    if sweep.selection.rule == "least_drift":
        best, selection = least_drift(records, sweep.selection.tolerance)
    artifact = best_artifact(best)
    summary = SweepSummary(
        sweep=sweep.name,
        metric=sweep.scheduler.metric,
        mode=sweep.scheduler.mode,
        trials=records,
        best=best,
        held_out=artifact.meta.metrics.get("evaluation") if artifact else None,
        selection=selection,
    )
    summary.write(root / RESULTS)
    summary = summary.model_dump(mode="json")
    plot_heatmap(records, sweep, root / "heatmap.png")
    if any(r["curve"] for r in records):  # none when trials report only their final validation
        plot_curves(records, sweep, root / "curves.png")
    if any(r["validation"] for r in records):
        plot_pareto(records, best, sweep, root / "pareto.png")
    return summary


def plot_pareto(records: list[dict], best: dict | None, sweep: SweepSpec, path: Path) -> None:
    """Validation domain score against drift (KL to the base), a point per trial, the
    Pareto front joined, the chosen trial ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["validation"] and "valid_kl" in r["validation"]
            and "valid_domain_score" in r["validation"]]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in done:
        v = r["validation"]
        ax.scatter(v["valid_kl"], 100 * v["valid_domain_score"], color="tab:blue", zorder=3)
        label = ", ".join(f"{k.split('.')[-1]}={_short(x)}" for k, x in r["params"].items())
        ax.annotate(label, (v["valid_kl"], 100 * v["valid_domain_score"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    front = pareto_front(records)
    if front:
        ax.plot([r["validation"]["valid_kl"] for r in front],
                [100 * r["validation"]["valid_domain_score"] for r in front],
                color="tab:orange", label="Pareto front", zorder=2)  # fmt: skip
    if best is not None and best.get("validation"):
        v = best["validation"]
        ax.scatter(v["valid_kl"], 100 * v["valid_domain_score"], s=250, facecolors="none",
                   edgecolors="tab:red", linewidths=2, label="chosen", zorder=4)  # fmt: skip
    ax.set_xlabel("KL(base ‖ tuned), nats/token, validation prompts (lower: less drift)")
    ax.set_ylabel("domain score on validation questions (%)")
    ax.set_title(f"{sweep.name}: domain score against drift")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heatmap(records: list[dict], sweep: SweepSpec, path: Path) -> None:
    """Best metric over LoRA rank × learning rate (the two most swept fields)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["params"].get("lora.r") for r in records} - {None})
    lrs = sorted({r["params"].get("train.learning_rate") for r in records} - {None})
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * max(len(lrs), 1), 1.2 + 0.8 * max(len(ranks), 1)))
    if ranks and lrs:
        import numpy as np

        grid = np.full((len(ranks), len(lrs)), np.nan)
        for r in records:
            p = r["params"]
            if r["best"] is not None and "lora.r" in p and "train.learning_rate" in p:
                i, j = ranks.index(p["lora.r"]), lrs.index(p["train.learning_rate"])
                old = grid[i, j]
                better = min if sweep.scheduler.mode == "min" else max
                grid[i, j] = r["best"] if np.isnan(old) else better(old, r["best"])
        image = ax.imshow(grid, cmap="viridis_r" if sweep.scheduler.mode == "min" else "viridis")
        ax.set_xticks(range(len(lrs)), [f"{x:.0e}" for x in lrs])
        ax.set_yticks(range(len(ranks)), [str(x) for x in ranks])
        for i in range(len(ranks)):
            for j in range(len(lrs)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w")
        fig.colorbar(image, ax=ax, label=sweep.scheduler.metric)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("LoRA rank")
    ax.set_title(f"{sweep.name}: best {sweep.scheduler.metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_curves(records: list[dict], sweep: SweepSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        if r["curve"]:
            xs, ys = zip(*r["curve"], strict=True)
            label = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["params"].items())
            ax.plot(xs, ys, marker="o", label=f"{label} ({r['state']})")
    ax.set_xlabel("step")
    ax.set_ylabel(sweep.scheduler.metric)
    ax.set_title(f"{sweep.name}: learning curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def promote(root: Path, registry: str) -> str:
    """Copy the best trial's artifact into the registry (a folder or URI), with its lineage."""
    summary = SweepSummary.read(root / RESULTS)
    best = summary.best
    if best is None or best.artifact is None:
        raise SweepError(f"{root}: no completed trial with an artifact to promote")
    source = load_artifact(best.artifact)
    target = storage.join(registry, source.name)
    if storage.exists(target):
        raise SweepError(f"{target} exists already; remove it or promote to another registry")
    meta = source.meta.model_copy(
        update={"lineage": SweepLineage(sweep=summary.sweep, trial=best.trial,
                                        metric=summary.metric, value=best.best)}
    )  # fmt: skip
    local = storage.local_path(registry)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=local))
    try:
        shutil.copytree(source.path, tmp, dirs_exist_ok=True)
        (tmp / storage.COMPLETE).unlink(missing_ok=True)
        meta.write(tmp / META)
        if local is not None:
            tmp.chmod(0o755)
            tmp.rename(local / source.name)
        else:
            storage.upload(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
