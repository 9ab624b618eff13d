"""Supervised fine-tuning recipe: TRL's SFTTrainer inside one Ray Train worker.

Reads top to bottom: spec back from the dict; data tokenised with the chat template (loss on
assistant tokens); the model the method asks for; SFTConfig from the spec; metrics and
checkpoints reported to Ray at every save; resume from Ray's checkpoint; the final weights
written by rank 0 to the run's staging folder for the driver to publish.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ftservice.config import JobSpec
from ftservice.data.loaders import expand, iter_examples
from ftservice.data.tokenize import tokenize_chat
from ftservice.models import ResolvedModel, build_model, load_tokenizer, train_dtype
from ftservice.train.deepspeed import deepspeed_config

FINAL = "final"
HISTORY = "history.json"


def load_rows(paths: list[str], fmt: str = "auto", system_prompt: str | None = None) -> list:
    """Every normalised row of the given files (small enough to hold: one worker's data)."""
    return [row for p in expand(paths) for _, _, row in iter_examples(p, fmt, system_prompt)]


def tokenized(rows: list[dict], tokenizer, max_length: int, completion_only: bool):
    """A datasets.Dataset of input_ids and labels (-100 where no loss)."""
    from datasets import Dataset

    records = []
    for row in rows:
        if row["kind"] == "text":
            ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"][:max_length]
            records.append({"input_ids": ids, "labels": list(ids)})
        else:
            out = tokenize_chat(tokenizer, row["messages"], max_length, completion_only)
            records.append({"input_ids": out["input_ids"], "labels": out["labels"]})
    return Dataset.from_list(records)


def sft_config(spec: JobSpec, output_dir: str, max_steps: int | None, has_eval: bool):
    from trl import SFTConfig

    t, ck = spec.train, spec.checkpoint
    dtype = train_dtype(t.precision)
    steps = max_steps or t.max_steps or -1
    evaluate = has_eval and spec.eval.every_steps is not None
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio),  # a float in [0, 1) is a ratio in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=str(dtype) == "torch.bfloat16",
        fp16=str(dtype) == "torch.float16",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        save_strategy="steps",
        save_steps=ck.every_steps,
        save_total_limit=1,  # local copies only; Ray keeps checkpoint.num_to_keep
        eval_strategy="steps" if evaluate else "no",
        eval_steps=spec.eval.every_steps if evaluate else None,
        max_length=spec.data.max_seq_length,
        # bfd packing is padding-free: examples are concatenated with restarting position_ids
        # and no attention mask, from which transformers builds a block-diagonal mask (sdpa,
        # eager) or varlen boundaries (flash attention); no example attends to another
        packing=spec.data.packing,
        packing_strategy="bfd",
        report_to="none",
        deepspeed=deepspeed_config(spec) if spec.method == "full" else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not spec.scaling.use_gpu,
        disable_tqdm=False,
    )


def stop_on_nonfinite_loss():
    """A TrainerCallback that ends training at the first NaN or infinite loss it sees.

    Diverged runs are deterministic: restarting or running on wastes the workers' time.
    The step is recorded so the driver refuses to publish and says why.
    """
    import math

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


def peak_memory() -> dict:
    """This process's peak resident memory (and the GPU's peak allocation where there is one)."""
    import resource

    import torch

    peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        peak["gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return peak


def train_loop(config: dict) -> None:
    """The Ray Train worker function (train_loop_per_worker)."""
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from trl import SFTTrainer

    spec = JobSpec.model_validate(config["spec"])
    model_ref = ResolvedModel(**config["model"])
    if not spec.scaling.use_gpu:
        # Ray starts workers with one intra-op thread; give torch the CPUs the worker holds
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    context = ray.train.get_context()
    rank = context.get_world_rank()

    tokenizer = load_tokenizer(model_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    d = spec.data
    train_rows = load_rows(d.train, d.format, d.system_prompt)
    train_ds = tokenized(train_rows, tokenizer, d.max_seq_length, d.completion_only_loss)
    eval_ds = None
    if d.eval:
        eval_rows = load_rows(d.eval, d.format, d.system_prompt)
        eval_ds = tokenized(eval_rows, tokenizer, d.max_seq_length, d.completion_only_loss)

    from transformers import set_seed

    set_seed(spec.train.seed)  # adapters initialise the same way on every run of the spec
    model = build_model(spec, model_ref)
    work = tempfile.mkdtemp(prefix=f"ftservice-{spec.name}-rank{rank}-")
    guard = stop_on_nonfinite_loss()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(spec, work, config.get("max_steps"), eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[guard, RayTrainReportCallback()],
    )
    trainer = prepare_trainer(trainer)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # Same step count and data order: the HF Trainer restores optimizer, scheduler,
        # RNG state and global step, and skips the batches of the epoch already seen.
        with checkpoint.as_directory() as folder:
            resume = Path(work) / "resume"
            shutil.copytree(Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME, resume)
        result = trainer.train(resume_from_checkpoint=str(resume))
    else:
        result = trainer.train()

    staging = Path(config["staging"])
    # Every rank takes part: under ZeRO-3 saving gathers the sharded weights.
    trainer.save_model(str(staging / FINAL))
    if rank == 0:
        tokenizer.save_pretrained(staging / FINAL)
        params = list(trainer.model_wrapped.parameters())
        history = {
            # under ZeRO-3 each rank holds a slice: local elements << ds_numel (the whole)
            "parameters_local": sum(p.numel() for p in params),
            "parameters_total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "world_size": context.get_world_size(),
            "log_history": trainer.state.log_history,
            "train_loss": result.training_loss,
            "global_step": trainer.state.global_step,
            "resumed": checkpoint is not None,
            "peak_memory": peak_memory(),
            "nonfinite_loss_step": guard.step,
        }
        (staging / HISTORY).write_text(json.dumps(history, indent=2, default=float))
    shutil.rmtree(work, ignore_errors=True)
