"""Preference training: TRL's DPOTrainer inside a Ray Train worker (`stage: dpo`).

The policy starts from an SFT artifact (`dpo.parent`) or from the base model. The reference
is never a second copy of the model for adapters:
- LoRA/QLoRA from an SFT adapter: the adapter is loaded trainable, and TRL adds a copy of it
  named "ref" on the same base (a few MB); the reference is the SFT policy, as DPO wants.
- LoRA/QLoRA from the base: a fresh adapter; its initial copy equals the base (B = 0).
- full: the reference log-probabilities are computed once by the starting policy before
  training (TRL's `precompute_ref_log_probs`), so no reference model is held at all.
Loss, beta and label smoothing are TRL's (`dpo.loss_type`, `dpo.beta`, `dpo.label_smoothing`),
with TRL's SFT term on the chosen answers added at `dpo.sft_weight`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from ftservice import storage
from ftservice.config import JobSpec
from ftservice.data.loaders import load_rows
from ftservice.models import ResolvedModel, build_model, device_map, load_base_for_adapters
from ftservice.train.common import training_arguments


def preference_dataset(rows: list[dict]):
    """TRL's conversational preference form: prompt turns, chosen and rejected answers."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": row["messages"],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            for row in rows
        ]
    )


def dpo_config(spec: JobSpec, output_dir: str, max_steps: int | None, has_eval: bool):
    from trl import DPOConfig

    d = spec.dpo
    return DPOConfig(
        **training_arguments(spec, output_dir, max_steps, has_eval),
        beta=d.beta,
        loss_type=[d.loss_type, "sft"] if d.sft_weight else [d.loss_type],
        loss_weights=[1.0, d.sft_weight] if d.sft_weight else None,
        label_smoothing=d.label_smoothing,
        max_length=spec.data.max_seq_length,
        precompute_ref_log_probs=spec.method == "full",
    )


def policy_model(
    spec: JobSpec, model_ref: ResolvedModel, parent: dict | None, placement: dict | None = None
):
    """The model DPO trains: the parent's adapter made trainable, its full weights, or a new
    model as SFT would build it."""
    if parent is None:
        return build_model(spec, model_ref, placement)
    if spec.method == "full":
        folder = storage.localize(parent["location"])
        return build_model(spec, dataclasses.replace(model_ref, path=folder), placement)
    from peft import PeftModel

    base = load_base_for_adapters(spec, model_ref, placement)
    return PeftModel.from_pretrained(base, storage.localize(parent["location"]), is_trainable=True)


def on_shared_disk(dataset, folder: Path | None):
    """The dataset saved once by rank 0 where every rank reads it.

    TRL's precomputed reference log-probabilities are written by rank 0 into a cache file
    beside the dataset's own files, and read there by the other ranks: an in-memory dataset
    has its cache in each process's own temporary folder, where the others never look.
    """
    import torch.distributed as dist
    from datasets import load_from_disk

    if folder is None or not (dist.is_available() and dist.is_initialized()):
        return dataset
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        dataset.save_to_disk(str(folder))
    dist.barrier()
    return load_from_disk(str(folder))


def dpo_trainer(
    spec, model_ref, parent, tokenizer, work, max_steps, callbacks,
    shared_dir: Path | None = None, device=None,
):  # fmt: skip
    from trl import DPOTrainer

    d = spec.data
    shared = shared_dir if spec.method == "full" else None  # only the precompute needs it
    train_ds = preference_dataset(load_rows(d.train, d.format, d.system_prompt))
    train_ds = on_shared_disk(train_ds, shared and shared / "train")
    eval_ds = None
    if d.eval:
        eval_ds = preference_dataset(
            load_rows(d.eval, d.format, d.system_prompt, "eval")[: d.max_eval_samples]
        )
        eval_ds = on_shared_disk(eval_ds, shared and shared / "eval")
    return DPOTrainer(
        model=policy_model(spec, model_ref, parent, device_map(device)),
        args=dpo_config(spec, work, max_steps, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
