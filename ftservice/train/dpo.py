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

Against forgetting (`data.replay` with `train.kl_to_base`, adapters only): the base's own
answers to general prompts are no preference pairs, so they teach through the KL term alone.
Their share beside the pairs (`replay_share`) is tokenised as SFT marks it, the base (every
adapter disabled: the original base, not the SFT parent) keeps its last hidden states on
their answers once before training (`base_hidden_states`), and each micro-batch of pairs
draws a replay batch (`ReplayBatches`) on which the policy's KL to the base is added to
TRL's loss (`KLToBaseDPOTrainer`).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from pathlib import Path

import torch
from trl import DPOTrainer

from ftservice import storage
from ftservice.config import JobSpec
from ftservice.data.loaders import DataError, load_rows
from ftservice.models import ResolvedModel, build_model, device_map, load_base_for_adapters
from ftservice.train.common import training_arguments
from ftservice.train.kl_to_base import ANSWER, BASE_AT, REPLAY, base_hidden_states, mean_kl
from ftservice.train.replay import replay_rows, replay_share
from ftservice.train.sft import tokenized


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


class ReplayBatches:
    """The replay examples `size` at a time, right-padded, from an endless run of seeded
    shuffles of them (each example once per shuffle): batch k is the k-th `size` examples
    of that run, whatever came before, so a resumed run reads the batches it would have."""

    def __init__(self, examples, size: int, seed: int, pad_id: int):
        self.records = [
            (ids, at)
            for ids, at in zip(examples["input_ids"], examples[BASE_AT], strict=True)
            if max(at) >= 0  # an answer cut away by max_seq_length leaves nothing to match
        ]
        self.size, self.seed, self.pad_id = size, seed, pad_id

    def order(self, shuffle: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"{self.seed}/{shuffle}").shuffle(order)
        return order

    def __call__(self, k: int) -> dict[str, torch.Tensor]:
        n = len(self.records)
        first = k * self.size
        orders = {s: self.order(s) for s in {first // n, (first + self.size - 1) // n}}
        picked = [self.records[orders[i // n][i % n]] for i in range(first, first + self.size)]
        width = max(len(ids) for ids, _ in picked)

        def padded(rows, fill):  # right padding: each token keeps the position it had alone
            return torch.tensor([row + [fill] * (width - len(row)) for row in rows])

        return {
            "input_ids": padded([ids for ids, _ in picked], self.pad_id),
            "attention_mask": padded([[1] * len(ids) for ids, _ in picked], 0),
            BASE_AT: padded([at for _, at in picked], -1),
        }


def replay_batches(spec: JobSpec, replay: str, pairs: int, tokenizer, model):
    """The replay examples DPO draws from, as `ReplayBatches`, and the base's last hidden
    states on their answers ([positions, hidden], on the CPU).

    round(pairs·r/(1−r)) examples (r = data.replay.ratio), as SFT mixes in beside as many
    rows; each micro-batch of pairs draws round(micro_batch_size·r/(1−r)) of them (at least
    one), so that the replay examples are that share of what each step sees, and an epoch of
    pairs sees each of them about once."""
    d, t = spec.data, spec.train
    rows = replay_share(pairs, replay_rows(replay), d.replay.ratio, t.seed)
    examples = tokenized(rows, tokenizer, d.max_seq_length, True, marks=True) if rows else None
    if examples is None or not any(ANSWER in marks for marks in examples[REPLAY]):
        raise DataError(
            f"data.replay: the {len(rows)} replay examples drawn beside {pairs} preference "
            f"pairs (ratio {d.replay.ratio:g}) hold no token of the base's answers within "
            f"data.max_seq_length ({d.max_seq_length}), so train.kl_to_base has nothing to "
            "act on; raise data.replay.ratio or data.max_seq_length."
        )
    base_hidden, examples = base_hidden_states(model, examples, packed=False)
    size = max(1, round(t.micro_batch_size * d.replay.ratio / (1 - d.replay.ratio)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id
    print(
        f"ftservice: replay: {len(rows)} base answers beside {pairs} preference pairs, "
        f"{size} with each micro-batch of {t.micro_batch_size} pairs, taught by KL to the "
        f"base × {t.kl_to_base:g}", file=sys.stderr, flush=True,
    )  # fmt: skip
    return ReplayBatches(examples, size, t.seed, pad_id), base_hidden


class KLToBaseDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss adds kl_to_base × KL(base ‖ policy) on the answer tokens of a
    replay batch drawn beside each micro-batch of pairs, the base's hidden states there read
    from `base_hidden` (rows named by `base_at`)."""

    kl_to_base: float = 0.0
    base_hidden: torch.Tensor | None = None
    replay: ReplayBatches | None = None
    _micro_step: tuple[int, int] = (-1, 0)  # (global step, micro-step within it) last drawn

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        batch = {k: v.to(self.accelerator.device) for k, v in self.replay(self.draw()).items()}
        base_at = batch.pop(BASE_AT)
        peft_model = self.accelerator.unwrap_model(model)
        # the policy: the trainable adapter is the active one here (TRL activates its "ref"
        # copy only for the reference's forward); the body alone, as the base's states were
        # made, so no [tokens, vocab] logits are built: [batch, tokens, hidden]
        body = peft_model.get_base_model().base_model
        hidden = body(**batch, use_cache=False).last_hidden_state
        kl = mean_kl(peft_model, hidden, base_at, self.base_hidden)
        self._metrics["train"]["kl_to_base"].append(kl.item())
        # DPO's loss is a mean over the micro-batch, and the Trainer divides what this returns
        # by the accumulation steps (TRL's loss_is_scaled_for_ga = False): the mean KL with it
        loss = loss + self.kl_to_base * kl
        return (loss, outputs) if return_outputs else loss

    def draw(self) -> int:
        """This micro-step's replay batch: global step × accumulation steps + the micro-step
        within it (the same after a resume); ranks read interleaved batches."""
        step, within = self.state.global_step, 0
        if self._micro_step[0] == step:
            within = self._micro_step[1] + 1
        self._micro_step = (step, within)
        k = step * self.args.gradient_accumulation_steps + within
        return k * self.args.world_size + self.args.process_index


def dpo_trainer(
    spec, model_ref, parent, tokenizer, work, max_steps, callbacks,
    shared_dir: Path | None = None, device=None, replay: str | None = None,
):  # fmt: skip
    """`replay`: the cached base answers, for the KL term where the spec asks for it."""
    d, kl = spec.data, spec.train.kl_to_base > 0
    shared = shared_dir if spec.method == "full" else None  # only the precompute needs it
    pairs = load_rows(d.train, d.format, d.system_prompt)
    train_ds = preference_dataset(pairs)
    train_ds = on_shared_disk(train_ds, shared and shared / "train")
    eval_ds = None
    if d.eval:
        eval_ds = preference_dataset(
            load_rows(d.eval, d.format, d.system_prompt, "eval")[: d.max_eval_samples]
        )
        eval_ds = on_shared_disk(eval_ds, shared and shared / "eval")
    model = policy_model(spec, model_ref, parent, device_map(device))
    if kl:  # before TRL adds its "ref" copy; the base's states once, before training
        batches, base_hidden = replay_batches(spec, replay, len(pairs), tokenizer, model)
    trainer = (KLToBaseDPOTrainer if kl else DPOTrainer)(
        model=model,
        args=dpo_config(spec, work, max_steps, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if kl:
        trainer.kl_to_base, trainer.base_hidden = spec.train.kl_to_base, base_hidden
        trainer.replay = batches
    return trainer
