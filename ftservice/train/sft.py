"""Supervised fine-tuning recipe: TRL's SFTTrainer, run by the Ray Train worker (`worker.py`).

Reads top to bottom: rows from the data files; tokenised with the chat template (loss on
assistant tokens); SFTConfig from the spec (packing where asked); the trainer on the model
the method asks for.
"""

from __future__ import annotations

from ftservice.config import JobSpec
from ftservice.data.loaders import load_rows
from ftservice.data.tokenize import tokenize_chat
from ftservice.models import build_model, device_map
from ftservice.train.attention import use_document_attention
from ftservice.train.common import training_arguments
from ftservice.train.lm_head import label_only_head


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

    return SFTConfig(
        **training_arguments(spec, output_dir, max_steps, has_eval),
        max_length=spec.data.max_seq_length,
        # bfd packing is padding-free: examples are concatenated with restarting position_ids
        # and no attention mask, from which transformers builds a block-diagonal mask (sdpa,
        # eager) or varlen boundaries (flash attention); no example attends to another
        packing=spec.data.packing,
        packing_strategy="bfd",
        remove_unused_columns=False,
    )


def sft_trainer(
    spec, model_ref, parent, tokenizer, work, max_steps, callbacks, shared_dir=None, device=None
):
    """SFTTrainer on already tokenised data (TRL uses input_ids + labels as they are);
    `device`: where the worker's model goes (the Trainer moves a plain model, but never a
    4-bit one: it must be loaded there)."""
    from trl import SFTTrainer

    d = spec.data
    train_ds = tokenized(
        load_rows(d.train, d.format, d.system_prompt), tokenizer, d.max_seq_length,
        d.completion_only_loss,
    )  # fmt: skip
    eval_ds = None
    if d.eval:
        eval_ds = tokenized(
            load_rows(d.eval, d.format, d.system_prompt, "eval")[: d.max_eval_samples], tokenizer,
            d.max_seq_length, d.completion_only_loss,
        )  # fmt: skip
    trainer = SFTTrainer(
        model=build_model(spec, model_ref, device_map(device)),
        args=sft_config(spec, work, max_steps, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    model = trainer.model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if spec.train.label_only_head:
        label_only_head(model)
    if spec.data.packing and spec.train.attention != "sdpa":
        use_document_attention(model)
    return trainer
