"""Supervised fine-tuning recipe: TRL's SFTTrainer, run by the Ray Train worker (`worker.py`).

Reads top to bottom: rows from the data files, with the base's replayed answers mixed in
where the spec asks (`replay.py`); tokenised with the chat template (loss on assistant
tokens); SFTConfig from the spec (packing where asked); the trainer on the model the method
asks for, with the KL to the base on replay tokens where asked (`kl_to_base.py`).
"""

from __future__ import annotations

from ftservice.config import JobSpec
from ftservice.data.loaders import load_rows
from ftservice.data.tokenize import tokenize_chat
from ftservice.models import build_model, device_map
from ftservice.train.attention import use_document_attention
from ftservice.train.common import training_arguments
from ftservice.train.kl_to_base import (
    ANSWER,
    PROMPT,
    REPLAY,
    KLToBaseTrainer,
    ReplayMarks,
    base_hidden_states,
    pack_with_marks,
    with_base_at,
)
from ftservice.train.lm_head import label_only_head
from ftservice.train.replay import mix_replay, replay_rows


def tokenized(
    rows: list[dict], tokenizer, max_length: int, completion_only: bool, marks: bool = False
):
    """A datasets.Dataset of input_ids and labels (-100 where no loss); with `marks`, a
    `replay` column too (on a replay example's tokens PROMPT or ANSWER, and no CE label)."""
    from datasets import Dataset

    records = []
    for row in rows:
        if row["kind"] == "text":
            ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"][:max_length]
            record = {"input_ids": ids, "labels": list(ids)}
        else:
            out = tokenize_chat(tokenizer, row["messages"], max_length, completion_only)
            record = {"input_ids": out["input_ids"], "labels": out["labels"]}
        if marks and row.get("replay"):  # taught through the KL term alone, not the CE
            record[REPLAY] = [ANSWER if t != -100 else PROMPT for t in record["labels"]]
            record["labels"] = [-100] * len(record["labels"])
        elif marks:
            record[REPLAY] = [0] * len(record["input_ids"])
        records.append(record)
    return Dataset.from_list(records)


def sft_config(
    spec: JobSpec, output_dir: str, max_steps: int | None, has_eval: bool, marked: bool = False
):
    """`marked`: the rows carry replay marks, so TRL must keep them as they are (they are
    truncated already; TRL would drop replay examples, which have no CE label); they are
    packed already where the spec packs, padding-free."""
    from trl import SFTConfig

    packed = marked and spec.data.packing
    return SFTConfig(
        **training_arguments(spec, output_dir, max_steps, has_eval),
        max_length=None if marked else spec.data.max_seq_length,
        # bfd packing is padding-free: examples are concatenated with restarting position_ids
        # and no attention mask, from which transformers builds a block-diagonal mask (sdpa,
        # eager) or varlen boundaries (flash attention); no example attends to another
        packing=spec.data.packing and not packed,
        padding_free=packed,
        packing_strategy="bfd",
        remove_unused_columns=False,
    )


def sft_trainer(
    spec, model_ref, parent, tokenizer, work, max_steps, callbacks, shared_dir=None, device=None,
    replay: str | None = None,
):  # fmt: skip
    """SFTTrainer on already tokenised data (TRL uses input_ids + labels as they are);
    `device`: where the worker's model goes (the Trainer moves a plain model, but never a
    4-bit one: it must be loaded there); `replay`: the cached base answers to mix in."""
    from trl import SFTTrainer

    d, kl = spec.data, spec.train.kl_to_base > 0
    rows = load_rows(d.train, d.format, d.system_prompt)
    if replay:
        rows = mix_replay(rows, replay_rows(replay), d.replay.ratio, spec.train.seed)
    train_ds = tokenized(rows, tokenizer, d.max_seq_length, d.completion_only_loss, marks=kl)
    eval_ds = None
    if d.eval:
        eval_ds = tokenized(
            load_rows(d.eval, d.format, d.system_prompt, "eval")[: d.max_eval_samples], tokenizer,
            d.max_seq_length, d.completion_only_loss, marks=kl,
        )  # fmt: skip
    model = build_model(spec, model_ref, device_map(device))
    if d.packing and spec.train.attention != "sdpa":
        use_document_attention(model)  # before the base runs on the replay examples
    packed = kl and d.packing  # the marks must be packed with their tokens: packed here
    if kl:  # the base's hidden states on the replay answers, once, before training
        base_hidden, train_ds = base_hidden_states(model, train_ds, packed)
        if eval_ds is not None:  # evaluation computes no KL
            eval_ds = with_base_at(eval_ds)
    if packed:
        train_ds = pack_with_marks(train_ds, d.max_seq_length, spec.train.seed)
        if eval_ds is not None:
            eval_ds = pack_with_marks(eval_ds, d.max_seq_length, spec.train.seed)
    trainer = (KLToBaseTrainer if kl else SFTTrainer)(
        model=model,
        args=sft_config(spec, work, max_steps, eval_ds is not None, marked=kl),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if kl:
        trainer.kl_to_base, trainer.base_hidden = spec.train.kl_to_base, base_hidden
        trainer.data_collator = ReplayMarks(trainer.data_collator)
    model = trainer.model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if spec.train.label_only_head:
        label_only_head(model)
    return trainer
