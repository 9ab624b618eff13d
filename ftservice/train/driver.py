"""The training driver: a Ray Train TorchTrainer from a job spec, then the artifact.

The run name comes from the spec (never a timestamp), so running the same spec again finds
the same run in storage and Ray Train resumes it from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftservice import storage
from ftservice.artifacts import (
    Artifact,
    ArtifactError,
    BaseModelRef,
    find_published,
    load_artifact,
    publish,
    update_metrics,
)
from ftservice.config import JobSpec
from ftservice.data.loaders import DataError, TrainingInputs, load_rows, training_inputs
from ftservice.errors import FtserviceError
from ftservice.evaluate import eval_placement, evaluate_artifact_folder
from ftservice.models import ResolvedModel, portable_name, resolve_model
from ftservice.raycluster import own_task
from ftservice.train import worker
from ftservice.train.common import (
    FINAL,
    HISTORY,
    ParentRef,
    TrainHistory,
    WorkerConfig,
    cpu_threads,
)
from ftservice.train.replay import ensure_replay

STAGE_KINDS = {"sft": {"chat", "text"}, "dpo": {"preference"}}
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # the checkpoints Ray Train holds


class TrainingDiverged(FtserviceError):
    """The loss became NaN or infinite; nothing was published."""

    def __init__(self, spec: JobSpec, step: int, run_dir: Path):
        self.step = step
        super().__init__(
            f"training of '{spec.name}' diverged: the loss became NaN or infinite at step "
            f"{step}, so nothing was published (run folder: {run_dir}). Lower "
            f"train.learning_rate (now {spec.train.learning_rate:g}), keep "
            "train.max_grad_norm small, or train in fp32 (train.precision: fp32)."
        )


class ParentMismatch(ArtifactError):
    """The parent artifact was trained on another base model."""


def resolve_parent(spec: JobSpec, base: ResolvedModel) -> Artifact | None:
    """The artifact a DPO run starts from, checked against the base and the method before
    any worker starts."""
    if spec.stage != "dpo" or spec.dpo.parent is None:
        return None
    parent = load_artifact(spec.dpo.parent, spec.output.registry)
    if parent.base_fingerprint != base.fingerprint:
        raise ParentMismatch(
            f"dpo.parent '{parent.name}' ({parent.location}) was trained on base model "
            f"'{parent.meta.base_model.name}' (fingerprint "
            f"{parent.base_fingerprint[:12]}), but this spec's model is '{spec.model.name}' "
            f"(fingerprint {base.fingerprint[:12]}); set model.name to the parent's base, or "
            "start from an artifact trained on this one."
        )
    if parent.is_adapter != (spec.method in ("lora", "qlora")):
        raise ArtifactError(
            f"dpo.parent '{parent.name}' holds {parent.method} weights, which a "
            f"method '{spec.method}' run cannot start from; use method: "
            f"{'lora or qlora' if parent.is_adapter else 'full'}."
        )
    return parent


def preference_metrics(log_history: list[dict]) -> dict:
    """First and last logged DPO rewards (accuracy, margin, chosen, rejected)."""
    logs = [h for h in log_history if "rewards/margins" in h]
    if not logs:
        return {}

    def pick(h):
        return {k: v for k, v in h.items() if k.startswith("rewards/")}

    return {"first": pick(logs[0]), "last": pick(logs[-1])}


@dataclass
class TrainResult:
    artifact: Artifact | None  # None while paused at a rung
    evaluation: dict
    resumed: bool
    paused_at: int | None = None  # the step a sweep's trial stopped at, to wait there
    log_history: list | None = None


def run_name(spec: JobSpec) -> str:
    """<name>-<hash of what the run trains>: the same spec names the same run."""
    body = spec.model_dump(mode="json", exclude={"output", "runtime", "cluster"})
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
    return f"{spec.name}-{digest}"


def _refuse_kinds(spec: JobSpec, rows: list[dict], field: str) -> None:
    wanted = STAGE_KINDS[spec.stage]
    wrong = [r for r in rows if r["kind"] not in wanted]
    if not wrong:
        return
    kinds = sorted({r["kind"] for r in wrong})
    if "prompt" in kinds:
        hint = (
            "prompt-only data has no answers to learn from; use it where prompts are wanted "
            "(eval.general, a feedback campaign's prompt set), and train on data with answers"
        )
    elif "unpaired" in kinds:
        hint = (
            "unpaired (KTO) answers have no stage here yet; export the votes as pairs instead "
            "(ftservice feedback export C --format trl) for stage: dpo"
        )
    elif "preference" in kinds:
        hint = "preference pairs train with stage: dpo"
    else:
        hint = "SFT data (conversations with an assistant turn, or text) trains with stage: sft"
    raise DataError(
        f"{field}: {len(wrong)} of {len(rows)} examples are {', '.join(kinds)} data, which "
        f"stage '{spec.stage}' cannot learn from (first: {wrong[0]['id']}); {hint}."
    )


def check_data(spec: JobSpec) -> TrainingInputs:
    """Load the training rows (and held-out rows) and refuse data that does not fit the
    stage, before any worker starts."""
    d = spec.data
    inputs = training_inputs(d.train, d.format, d.system_prompt)
    _refuse_kinds(spec, inputs.rows, "data.train")
    if d.eval:
        _refuse_kinds(spec, load_rows(d.eval, d.format, d.system_prompt, "eval"), "data.eval")
    return inputs


def _trainer(
    spec: JobSpec,
    model: ResolvedModel,
    parent,
    name: str,
    runs: str,
    max_steps,
    callbacks: list | None = None,
    pause_at: list[int] | None = None,
    replay: str | None = None,
):
    # Workers stay in the job's working directory (the project folder, or the working_dir
    # that `ftservice submit` uploaded), so the spec's relative data paths mean the same
    # thing to them as to the driver. Ray Train's default moves them into the run folder.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    sc, ck = spec.scaling, spec.checkpoint
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    scored = bool(spec.data.eval) and spec.eval.every_steps is not None
    return TorchTrainer(
        worker.train_loop,
        train_loop_config=WorkerConfig(
            spec=spec.model_dump(mode="json"),
            model=model,
            staging=storage.join(runs, name, "staging"),
            max_steps=max_steps,
            pause_at=pause_at,
            replay=replay,
            parent=ParentRef(name=parent.name, location=_absolute(parent.location))
            if parent
            else None,
        ).model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=runs,
            callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=ck.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=ck.num_to_keep,
                checkpoint_score_attribute=ck.score_attribute if scored else None,
                checkpoint_score_order=ck.score_order,
            ),
        ),
    )


def _absolute(location: str) -> str:
    """Workers may start elsewhere: a local location made absolute, a URI as it is."""
    local = storage.local_path(location)
    return str(local.resolve()) if local is not None else location


def evaluate_remote(spec: JobSpec, artifact: Artifact, base: ResolvedModel, limit=None) -> dict:
    """Evaluation as a Ray task with the GPUs its placement holds the models on (one
    worker's, or a node's for full fine-tuning), so a cluster driver without accelerators can
    still run it. The task's process exits after it (`max_calls=1`): the models' memory goes
    back at once, and the peak it reports is the evaluation's own."""
    import ray

    placement = eval_placement(spec)
    task = own_task(evaluate_artifact_folder, spec.scaling.cpus_per_worker, placement["gpus"])
    return ray.get(
        task.remote(
            _absolute(artifact.location),
            str(base.path),
            spec.method in ("lora", "qlora"),
            spec.eval.domain,
            spec.eval.general,
            spec.eval.max_new_tokens,
            limit,
            spec.data.system_prompt,
            cpu_threads(spec),
            placement,
            base.fingerprint,
        )
    )


def drop_checkpoints(run: str) -> int:
    """Delete a finished run's Train checkpoints (its artifact holds the final weights);
    returns how many went."""
    checkpoints = [f for f in storage.list_dirs(run) if f.startswith("checkpoint_")]
    for folder in checkpoints:
        storage.remove_tree(storage.join(run, folder))
    return len(checkpoints)


def held_checkpoints(run: str) -> set[str]:
    """The run's `checkpoint_*` folders that Ray Train's checkpoint manager holds: the ones
    a resumed run can start from. A folder is written before the worker reports it, so a
    run stopped in between leaves a folder that Ray never registered (and never resumes
    from, nor deletes under `num_to_keep`)."""
    snapshot = storage.join(run, CHECKPOINT_SNAPSHOT)
    if not storage.is_file(snapshot):
        return set()
    results = json.loads(storage.read_text(snapshot)).get("checkpoint_results", [])
    return {r["checkpoint_dir_name"] for r in results}


def drop_stray_checkpoints(run: str) -> list[str]:
    """Delete a finished run's checkpoint folders that Ray Train does not hold (a worker
    killed while reporting a checkpoint leaves one). Returns the folders that went."""
    if not storage.is_file(storage.join(run, CHECKPOINT_SNAPSHOT)):
        return []
    held = held_checkpoints(run)
    stray = [f for f in storage.list_dirs(run) if f.startswith("checkpoint_") and f not in held]
    for folder in stray:
        storage.remove_tree(storage.join(run, folder))
    return stray


def _fetch_staging(staged_at: str) -> Path:
    """The staging folder on this machine (a download when runs live in a store)."""
    local = storage.local_path(staged_at)
    if local is not None:
        return local
    return storage.download(staged_at, Path(tempfile.mkdtemp(prefix="ftservice-staged-")) / "s")


def _drop_staging(staged_at: str, staging: Path) -> None:
    storage.remove_tree(staged_at)
    if storage.local_path(staged_at) is None:  # and this machine's download of it
        shutil.rmtree(staging.parent, ignore_errors=True)


def train(
    spec: JobSpec,
    max_steps: int | None = None,
    evaluate: bool = True,
    eval_limit: int | None = None,
    callbacks: list | None = None,
    pause_at: list[int] | None = None,
    feedback=None,
    extra_files: dict[str, str] | None = None,
) -> TrainResult:
    """Train (or resume) the run the spec names, publish its artifact, evaluate it.

    With `pause_at` (a sweep's rungs), training stops at the first of those steps after the
    one it resumed from, with a checkpoint there, and nothing is published: the result has
    `paused_at`, and training the same spec again goes on from that step. `feedback` and
    `extra_files`: a loop's lineage and the files it adds to the artifact (the vote ids).

    Ray must be initialised (ftservice.raycluster.init_ray)."""
    name = run_name(spec) if max_steps is None else f"{run_name(spec)}-steps{max_steps}"
    registry = spec.output.registry
    published = find_published(registry, name)
    if published is not None:
        print(f"ftservice: run {name} already published {published.location}", file=sys.stderr)
        return TrainResult(published, published.meta.metrics.get("evaluation", {}), True)

    inputs = check_data(spec)
    base = resolve_model(spec.model)
    parent = resolve_parent(spec, base)
    runs = _absolute(spec.output.storage_path)
    staged_at = storage.join(runs, name, "staging")  # where rank 0 leaves weights and history
    storage.remove_tree(staged_at)
    if storage.local_path(runs) is not None:
        Path(staged_at).mkdir(parents=True)
    replay = ensure_replay(spec, base) if spec.data.replay else None
    print(
        f"ftservice: training {name}: {spec.method} {spec.stage} of {spec.model.name} on "
        f"{len(inputs.rows)} examples"
        + (f" and replay of {replay.examples} base answers" if replay else "")
        + f", {spec.scaling.num_workers} worker(s)",
        file=sys.stderr,
    )
    result = _trainer(
        spec, base, parent, name, runs, max_steps, callbacks, pause_at,
        replay=_absolute(replay.location) if replay else None,
    ).fit()  # fmt: skip
    if result.error is not None:
        raise result.error
    staging = _fetch_staging(staged_at)
    history = TrainHistory.read(staging / HISTORY)
    logs = history.log_history
    if history.nonfinite_loss_step is not None:
        _drop_staging(staged_at, staging)
        raise TrainingDiverged(spec, history.nonfinite_loss_step, storage.join(runs, name))
    if history.paused_at is not None:
        _drop_staging(staged_at, staging)
        return TrainResult(None, {}, history.resumed, history.paused_at, logs)
    metrics = {
        "train_loss": history.train_loss,
        "global_step": history.global_step,
        "first_loss": next((h["loss"] for h in logs if "loss" in h), None),
        "last_loss": next((h["loss"] for h in reversed(logs) if "loss" in h), None),
        "resumed": history.resumed,
        "preference": preference_metrics(logs),
        "best_eval_loss": min((h["eval_loss"] for h in logs if "eval_loss" in h), default=None),
        "peak_memory_rank0": history.peak_memory.model_dump(),
        "replay": {
            "fingerprint": replay.fingerprint,
            "location": replay.location,
            "examples": replay.examples,
        }
        if replay
        else None,
        "partition": history.model_dump(
            include={"parameters_local", "parameters_total", "world_size"}
        ),
    }
    artifact = publish(
        registry,
        spec.name,
        staging / FINAL,
        spec=spec.model_dump(mode="json"),
        run_name=name,
        base_model=BaseModelRef(
            name=spec.model.name,
            fingerprint=base.fingerprint,
            kind=base.kind,
            load_as=portable_name(base),
            path=str(base.path),
        ),
        dataset_fingerprint=inputs.fingerprint,
        data=inputs.sources,
        metrics=metrics,
        log_history=logs,
        parent=parent.name if parent else None,
        feedback=feedback,
        extra_files=extra_files,
    )
    _drop_staging(staged_at, staging)
    if storage.local_path(runs) is not None:  # DPO's shared dataset copy
        shutil.rmtree(Path(runs, name, "data"), ignore_errors=True)
    if spec.output.keep_checkpoints:
        drop_stray_checkpoints(storage.join(runs, name))
    else:
        drop_checkpoints(storage.join(runs, name))
    evaluation: dict = {}
    if evaluate and (spec.eval.domain or spec.eval.general):
        evaluation = evaluate_remote(spec, artifact, base, eval_limit)
        artifact = update_metrics(artifact, {"evaluation": evaluation})
    return TrainResult(artifact, evaluation, history.resumed)
