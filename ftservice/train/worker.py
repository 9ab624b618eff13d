"""The Ray Train worker function, the same for every stage.

Reads top to bottom: spec back from the dict; threads; the stage's recipe builds its TRL
trainer (SFT: `sft.py`, DPO: `dpo.py`) with our callbacks; Ray's checkpoint restored when
there is one; training; every rank saves (ZeRO-3 gathers), rank 0 writes the history that the
driver publishes from.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import ray.train
import torch
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from transformers import set_seed

from ftservice import storage
from ftservice.config import JobSpec
from ftservice.models import load_tokenizer
from ftservice.train import dpo, sft
from ftservice.train.common import (
    EVENTS,
    FINAL,
    HISTORY,
    LogEvents,
    PauseAtRung,
    StopOnNonFiniteLoss,
    TrainHistory,
    WorkerConfig,
    cpu_threads,
    peak_memory,
    tracking_env,
    worker_device,
)

PICKLED_ARGS = "training_args.bin"  # what Trainer.save_model adds; artifacts hold no pickle


def train_loop(config: dict) -> None:
    """The Ray Train worker function (train_loop_per_worker)."""
    cfg = WorkerConfig.parse(config, "the worker's train_loop_config")
    spec = JobSpec.model_validate(cfg.spec)
    model_ref = cfg.model
    if not spec.scaling.use_gpu:
        # Ray starts workers with one intra-op thread; give torch the CPUs the worker holds
        torch.set_num_threads(cpu_threads(spec))
    context = ray.train.get_context()
    rank = context.get_world_rank()

    tokenizer = load_tokenizer(model_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(spec.train.seed)  # adapters initialise the same way on every run of the spec
    work = tempfile.mkdtemp(prefix=f"ftservice-{spec.name}-rank{rank}-")
    guard = StopOnNonFiniteLoss()
    scored = bool(spec.data.eval) and spec.eval.every_steps is not None
    pause_steps = cfg.pause_at or []
    pause = PauseAtRung(pause_steps, scored)
    callbacks = [guard, pause, RayTrainReportCallback()]
    recipe = dpo.dpo_trainer if spec.stage == "dpo" else sft.sft_trainer
    build = functools.partial(recipe, replay=cfg.replay)
    parent = cfg.parent.model_dump() if cfg.parent else None
    local_staging = storage.local_path(cfg.staging)
    # where every rank sees the same files (ZeRO-3 DPO's precomputed reference): the run's
    # folder when runs are local; with runs in a store, one node's disk only
    shared = (local_staging or Path(work) / "staging").parent / "data"
    # trackers write beside the run's checkpoints (a local folder of this run; with runs in
    # a store, a folder of the worker's, uploaded to the run's folder at the end)
    run_dir = local_staging.parent if local_staging else Path(work) / "tracking"
    os.environ.update(tracking_env(spec, run_dir))
    # live events: in the run's folder, or uploaded there as the run goes on when runs
    # live in a store
    run_location = cfg.staging.rsplit("/", 1)[0] if local_staging is None else None
    upload_to = storage.join(run_location, EVENTS) if run_location else None
    callbacks.append(LogEvents(run_dir / EVENTS, upload_to))
    trainer = prepare_trainer(
        build(spec, model_ref, parent, tokenizer, work, cfg.max_steps, callbacks,
              shared_dir=shared, device=worker_device(spec))
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
    if "wandb" in spec.train.report_to:
        import wandb

        wandb.finish()  # the HF callback leaves the run open: its last records and exit now

    staging = local_staging or Path(work) / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    if pause.step is None:
        # Every rank takes part: under ZeRO-3 saving gathers the sharded weights.
        save_final(trainer, staging / FINAL)
    if rank == 0:
        if pause.step is None:
            tokenizer.save_pretrained(staging / FINAL)
        params = list(trainer.model_wrapped.parameters())
        TrainHistory(
            # under ZeRO-3 each rank owns a shard (ds_tensor) of every parameter; ds_numel
            # is the whole parameter
            parameters_local=sum(_local_elements(p) for p in params),
            parameters_total=sum(getattr(p, "ds_numel", p.numel()) for p in params),
            world_size=context.get_world_size(),
            log_history=json.loads(json.dumps(trainer.state.log_history, default=float)),
            train_loss=result.training_loss if result else None,
            global_step=trainer.state.global_step,
            resumed=checkpoint is not None,
            peak_memory=peak_memory(),
            nonfinite_loss_step=guard.step,
            paused_at=pause.step,
        ).write(staging / HISTORY)
        if local_staging is None:
            storage.upload(staging, cfg.staging)
            for tracker in ("tensorboard", "wandb"):  # the trackers' files in the run
                if (run_dir / tracker).is_dir():
                    storage.upload(run_dir / tracker, storage.join(
                        cfg.staging.rsplit("/", 1)[0], tracker))  # fmt: skip
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
    if trainer.is_world_process_zero():
        (folder / PICKLED_ARGS).unlink(missing_ok=True)
