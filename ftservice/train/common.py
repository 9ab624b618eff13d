"""What both recipes (`sft.py`, `dpo.py`) and the worker share: the training arguments from the
spec, our TrainerCallbacks, and the two hand-offs between the driver and the workers (the
worker's config and `history.json`)."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch
from pydantic import Field
from transformers import TrainerCallback

from ftservice import storage
from ftservice.config import JobSpec
from ftservice.models import ResolvedModel, train_dtype
from ftservice.records import Record, Strict
from ftservice.train.deepspeed import deepspeed_config

FINAL = "final"
OPTIMIZERS = {"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}
"""train.optimizer -> TrainingArguments.optim (adamw: the Trainer's default, torch's AdamW)."""
HISTORY = "history.json"


class ParentRef(Strict):
    name: str
    location: str = Field(description="Where the parent artifact lives (folder or URI).")


class WorkerConfig(Record):
    """What the driver hands each Ray Train worker (`train_loop_config`)."""

    format_version: int = 1
    spec: dict = Field(description="The job spec, dumped; the worker validates it again.")
    model: ResolvedModel
    staging: str = Field(
        description="Where rank 0 leaves the final weights and history.json (folder or URI)."
    )
    max_steps: int | None = None
    pause_at: list[int] | None = Field(None, description="A sweep's rungs to stop at.")
    parent: ParentRef | None = None
    replay: str | None = Field(
        None, description="The cached base answers to mix in (data.replay), folder or URI."
    )


class PeakMemory(Strict):
    rss_bytes: int
    gpu_allocated_bytes: int | None = None


class TrainHistory(Record):
    """`history.json`: what rank 0 hands the driver, which publishes from it."""

    format_version: int = 1
    parameters_local: int
    parameters_total: int
    world_size: int
    log_history: list[dict]
    train_loss: float | None
    global_step: int
    resumed: bool
    peak_memory: PeakMemory
    nonfinite_loss_step: int | None
    paused_at: int | None


def cpu_threads(spec: JobSpec) -> int:
    """The torch threads of a CPU worker (Ray starts workers with one)."""
    sc = spec.scaling
    return sc.threads_per_worker or max(1, int(sc.cpus_per_worker))


def tracking_env(spec: JobSpec, run_dir: Path) -> dict[str, str]:
    """The environment the HF Trainer's tracker integrations read (set in the worker before
    the trainer is built; they write from rank 0 only): TensorBoard's event files in the
    run's folder, MLflow's run in tracking.uri (a file store in the runs' folder by default)
    under the experiment, with the spec's tags; W&B's run in the experiment's project (its
    files, and an offline run, in the run's folder)."""
    env: dict[str, str] = {}
    if "tensorboard" in spec.train.report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "mlflow" in spec.train.report_to:
        tr = spec.tracking
        uri = tr.uri or (run_dir.parent / "mlruns").resolve().as_uri()
        env |= {
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_EXPERIMENT_NAME": tr.experiment or spec.name,
            "MLFLOW_TAGS": json.dumps({"ftservice.job": spec.name, **tr.tags}),
            "HF_MLFLOW_LOG_ARTIFACTS": "0",  # the registry holds the weights
        }
        if uri.startswith("file:"):  # mlflow >= 3.13 asks for the file store explicitly
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "wandb" in spec.train.report_to:
        tr = spec.tracking
        tags = {"ftservice.job": spec.name, **tr.tags}
        env |= {
            "WANDB_DIR": str(run_dir),  # wandb/ in the run's folder: offline runs, logs
            "WANDB_PROJECT": tr.experiment or spec.name,
            "WANDB_TAGS": ",".join(f"{k}={v}" for k, v in tags.items()),  # W&B tags: labels
            "WANDB_LOG_MODEL": "false",  # the registry holds the weights
        }
        if tr.wandb_mode:
            env["WANDB_MODE"] = tr.wandb_mode
    return env


def worker_device(spec: JobSpec):
    """The device this Ray Train worker's adapters' base is placed on: its GPU (Ray Train
    sets CUDA_VISIBLE_DEVICES per worker; `get_device` names the one it got). None on CPUs,
    and for full fine-tuning, whose weights DeepSpeed's ZeRO-3 places (partitioned) itself."""
    if not spec.scaling.use_gpu or spec.method == "full":
        return None
    import ray.train.torch

    return ray.train.torch.get_device()


def training_arguments(spec: JobSpec, output_dir: str, max_steps: int | None, has_eval: bool):
    """The TrainingArguments fields every stage shares, from the spec."""
    t, ck = spec.train, spec.checkpoint
    dtype = train_dtype(t.precision)
    evaluate = has_eval and spec.eval.every_steps is not None
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": t.micro_batch_size,
        "per_device_eval_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.epochs,
        "max_steps": max_steps or t.max_steps or -1,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": float(t.warmup_ratio),  # a float in [0, 1) is a ratio in transformers 5
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "data_seed": t.seed,
        "gradient_checkpointing": t.gradient_checkpointing,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "logging_steps": t.logging_steps,
        "logging_nan_inf_filter": False,  # a NaN loss must show, not be averaged away
        "save_strategy": "steps",
        "save_steps": ck.every_steps,
        "save_total_limit": 1,  # local copies only; Ray keeps checkpoint.num_to_keep
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": spec.eval.every_steps if evaluate else None,
        "report_to": list(t.report_to) or "none",
        "run_name": spec.name,
        **({"optim": OPTIMIZERS[t.optimizer]} if t.optimizer != "adamw" else {}),
        "deepspeed": deepspeed_config(spec) if spec.method == "full" else None,
        "dataloader_num_workers": 0,
        "use_cpu": not spec.scaling.use_gpu,
        "disable_tqdm": False,
    }


class StopOnNonFiniteLoss(TrainerCallback):
    """Ends training at the first NaN or infinite loss it sees.

    Diverged runs are deterministic: restarting or running on wastes the workers' time.
    The step is recorded so the driver refuses to publish and says why.
    """

    def __init__(self):
        self.step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.step is None:
            self.step = state.global_step
            control.should_training_stop = True
            control.should_save = False


EVENTS = "events.jsonl"  # the run's logged steps, a line each, as they happen


class LogEvents(TrainerCallback):
    """Appends every log of the run (its step, time, loss, learning rate, ...) to a JSONL
    file in the run's folder as it happens (rank 0): what the jobs API shows as events
    while the run goes on. A run resumed from a checkpoint appends the steps it repeats.

    With runs in a store (`upload_to`, a URI) the file is kept on the worker and uploaded
    whole (a store has no append) at most every `every_s` and when training ends; a resumed
    run starts from the uploaded file."""

    def __init__(self, path: Path, upload_to: str | None = None, every_s: float = 5.0):
        self.path, self.upload_to, self.every_s = path, upload_to, every_s
        self.uploaded = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.upload_to is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if storage.is_file(self.upload_to):
            self.path.write_text(storage.read_text(self.upload_to))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "time": time.time(), **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self.upload_to is not None and time.monotonic() - self.uploaded >= self.every_s:
            self.upload()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.upload_to is not None and self.path.is_file():
            self.upload()

    def upload(self) -> None:
        storage.write_text(self.upload_to, self.path.read_text())
        self.uploaded = time.monotonic()


class PauseAtRung(TrainerCallback):
    """Ends training at the first of `steps` after the step it started (or resumed) from,
    short of the last step, with an evaluation and a checkpoint there: a sweep's trial waits
    at that rung, and its next run resumes from it."""

    def __init__(self, steps: list[int], evaluate: bool):
        self.steps, self.evaluate = steps, evaluate
        self.start = 0
        self.step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step in self.steps and self.start < step < state.max_steps:
            self.step = step
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = self.evaluate


def peak_memory() -> PeakMemory:
    """This process's peak resident memory (and the GPU's peak allocation where there is one)."""
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return PeakMemory(rss_bytes=rss, gpu_allocated_bytes=gpu)
