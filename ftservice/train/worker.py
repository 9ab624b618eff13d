"""The Ray Train worker function, the same for every stage.

Reads top to bottom: spec back from the dict; threads; the stage's recipe builds its TRL
trainer (SFT: `sft.py`, DPO: `dpo.py`) with our callbacks; Ray's checkpoint restored when
there is one; training; every rank saves (ZeRO-3 gathers), rank 0 writes the history that the
driver publishes from.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from ftservice.config import JobSpec
from ftservice.models import ResolvedModel, load_tokenizer, train_dtype
from ftservice.train.deepspeed import deepspeed_config

FINAL = "final"
HISTORY = "history.json"


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
        "bf16": dtype == _torch().bfloat16,
        "fp16": dtype == _torch().float16,
        "logging_steps": t.logging_steps,
        "logging_nan_inf_filter": False,  # a NaN loss must show, not be averaged away
        "save_strategy": "steps",
        "save_steps": ck.every_steps,
        "save_total_limit": 1,  # local copies only; Ray keeps checkpoint.num_to_keep
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": spec.eval.every_steps if evaluate else None,
        "report_to": "none",
        "deepspeed": deepspeed_config(spec) if spec.method == "full" else None,
        "dataloader_num_workers": 0,
        "use_cpu": not spec.scaling.use_gpu,
        "disable_tqdm": False,
    }


def _torch():
    import torch

    return torch


def stop_on_nonfinite_loss():
    """A TrainerCallback that ends training at the first NaN or infinite loss it sees.

    Diverged runs are deterministic: restarting or running on wastes the workers' time.
    The step is recorded so the driver refuses to publish and says why.
    """
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def __init__(self):
            self.step: int | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss) and self.step is None:
                self.step = state.global_step
                control.should_training_stop = True
                control.should_save = False

    return StopOnNonFiniteLoss()


def pause_at_rungs(steps: list[int], evaluate: bool):
    """A TrainerCallback that ends training at the first of `steps` after the step it
    started (or resumed) from, short of the last step, with an evaluation and a checkpoint
    there: a sweep's trial waits at that rung, and its next run resumes from it."""
    from transformers import TrainerCallback

    class PauseAtRung(TrainerCallback):
        def __init__(self):
            self.start = 0
            self.step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step in steps and self.start < step < state.max_steps:
                self.step = step
                control.should_training_stop = True
                control.should_save = True
                control.should_evaluate = evaluate

    return PauseAtRung()


def peak_memory() -> dict:
    """This process's peak resident memory (and the GPU's peak allocation where there is one)."""
    import resource

    torch = _torch()
    peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peak["gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def train_loop(config: dict) -> None:
    """The Ray Train worker function (train_loop_per_worker)."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import set_seed

    spec = JobSpec.model_validate(config["spec"])
    model_ref = ResolvedModel(**config["model"])
    if not spec.scaling.use_gpu:
        # Ray starts workers with one intra-op thread; give torch the CPUs the worker holds
        _torch().set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    context = ray.train.get_context()
    rank = context.get_world_rank()

    tokenizer = load_tokenizer(model_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(spec.train.seed)  # adapters initialise the same way on every run of the spec
    work = tempfile.mkdtemp(prefix=f"ftservice-{spec.name}-rank{rank}-")
    guard = stop_on_nonfinite_loss()
    scored = bool(spec.data.eval) and spec.eval.every_steps is not None
    pause_steps = config.get("pause_at") or []
    pause = pause_at_rungs(pause_steps, scored)
    callbacks = [guard, pause, RayTrainReportCallback()]
    if spec.stage == "dpo":
        from ftservice.train.dpo import dpo_trainer as build
    else:
        from ftservice.train.sft import sft_trainer as build
    trainer = prepare_trainer(
        build(spec, model_ref, config.get("parent"), tokenizer, work, config.get("max_steps"),
              callbacks, shared_dir=Path(config["staging"]).parent / "data")
    )  # fmt: skip

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # Same step count and data order: the HF Trainer restores optimizer, scheduler,
        # RNG state and global step, and skips the batches of the epoch already seen.
        with checkpoint.as_directory() as folder:
            resume = Path(work) / "resume"
            shutil.copytree(Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME, resume)
        saved = json.loads((resume / "trainer_state.json").read_text())
        if saved["global_step"] in pause_steps and saved["global_step"] < saved["max_steps"]:
            # a sweep trial stopped at a rung whose report never reached Tune (its driver was
            # killed): it waits there again instead of training past it
            pause.step = saved["global_step"]
            result = None
            trainer.state.log_history = saved["log_history"]
            trainer.state.global_step = saved["global_step"]
        else:
            result = trainer.train(resume_from_checkpoint=str(resume))
    else:
        result = trainer.train()

    staging = Path(config["staging"])
    if pause.step is None:
        # Every rank takes part: under ZeRO-3 saving gathers the sharded weights.
        save_final(trainer, staging / FINAL)
    if rank == 0:
        if pause.step is None:
            tokenizer.save_pretrained(staging / FINAL)
        params = list(trainer.model_wrapped.parameters())
        history = {
            # under ZeRO-3 each rank owns a shard (ds_tensor) of every parameter; ds_numel
            # is the whole parameter
            "parameters_local": sum(_local_elements(p) for p in params),
            "parameters_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "world_size": context.get_world_size(),
            "log_history": trainer.state.log_history,
            "train_loss": result.training_loss if result else None,
            "global_step": trainer.state.global_step,
            "resumed": checkpoint is not None,
            "peak_memory": peak_memory(),
            "nonfinite_loss_step": guard.step,
            "paused_at": pause.step,
        }
        (staging / HISTORY).write_text(json.dumps(history, indent=2, default=float))
    shutil.rmtree(work, ignore_errors=True)


def _local_elements(param) -> int:
    shard = getattr(param, "ds_tensor", None)
    return shard.numel() if shard is not None else param.numel()


def save_final(trainer, folder: Path) -> None:
    """The trained weights only: DPO's reference adapter (a copy TRL adds) is not part of it."""
    model = trainer.model
    peft_config = getattr(model, "peft_config", None)
    if peft_config and "ref" in peft_config:
        if trainer.is_world_process_zero():
            model.save_pretrained(str(folder), selected_adapters=["default"])
        return
    trainer.save_model(str(folder))
