"""KL(base ‖ tuned) on the replay tokens, in the training step (`train.kl_to_base`).

Reads top to bottom:
- the replay examples carry a `replay` mark on each of their tokens (ANSWER on the tokens of
  the base's answer, PROMPT on the rest) and no cross-entropy label: they teach through the
  KL term alone, since the cross-entropy on the base's greedy answer pulls towards a
  sharpened copy of the base (the forgetting sweep's `kl_to_base: 0` trials), the KL
  towards its whole distribution; packing them (TRL's best-fit-decreasing packing, done
  here so that the mark is packed with the tokens) and collating keep the mark beside the
  labels;
- the base is the same model with its adapter disabled (no second copy), and its head is
  frozen, so its next-token distribution at a position is softmax(h_b W^T) with h_b its last
  hidden state there: before training, the base runs once, without gradients, on each
  distinct replay example alone (`base_hidden_states`), and keeps h_b at the positions that
  predict a replay answer token; a `base_at` column gives each such position its row in that
  table (-1 elsewhere), and is packed and collated with the tokens. This is exact, since no
  example attends to another (packed rows restart positions and attend per document), and
  it spares every step the base's forward pass (each replay example comes back every epoch);
- the step runs TRL's SFT loss as usual, and a hook on the model's body keeps its last
  hidden states;
- on each position that has a `base_at` row, KL(p_base ‖ p_tuned) over the whole
  vocabulary, through the frozen LM head, in chunks of tokens (`KLToBase`, below): TRL's
  GKD `generalized_jsd_loss` with beta=0 is this divergence, but it takes both models'
  `[tokens, vocab]` logits and keeps them for the backward, and the tuned model's exist
  nowhere here (the label-only head never builds them);
- loss = SFT loss + kl_to_base × mean KL over those positions. The KL is logged as
  `kl_to_base` beside the loss.
DPO (`dpo.py`) takes the same term with the same pieces (`base_hidden_states`, `mean_kl`),
on replay batches of its own drawn beside each step's preference pairs.
"""

from __future__ import annotations

import sys
import time

import torch
from trl import SFTTrainer

from ftservice.train.lm_head import CHUNK_TOKENS, compute_dtype

REPLAY = "replay"  # the per-token mark column: 0 off replay examples, else PROMPT or ANSWER
PROMPT, ANSWER = 1, 2
BASE_AT = "base_at"  # per token: the row of the base's hidden state there, or -1


class KLToBase(torch.autograd.Function):
    """Per position, KL(softmax(h_b W^T) ‖ softmax(h_t W^T)) in chunks of tokens; its
    gradient w.r.t. h_t, (p_t − p_b) W, is made in the forward (W is frozen, h_b constant)."""

    @staticmethod
    def forward(ctx, tuned_hidden, base_hidden, weight, chunk: int):
        n = tuned_hidden.size(0)
        kl = torch.empty(n, dtype=torch.float32, device=tuned_hidden.device)
        jacobian = torch.empty_like(tuned_hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            end = start + chunk
            log_t = torch.log_softmax((tuned_hidden[start:end] @ weight.T).float(), dim=-1)
            log_b = torch.log_softmax((base_hidden[start:end] @ weight.T).float(), dim=-1)
            p_b = log_b.exp()
            kl[start:end] = torch.linalg.vecdot(p_b, log_b - log_t)
            if jacobian is not None:
                jacobian[start:end] = (log_t.exp_() - p_b).to(weight.dtype) @ weight
        ctx.save_for_backward(jacobian)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (jacobian,) = ctx.saved_tensors
        grad = None if jacobian is None else grad_kl[:, None].to(jacobian.dtype) * jacobian
        return grad, None, None, None


def kl_per_position(tuned_hidden, base_hidden, weight) -> torch.Tensor:
    """KL(base ‖ tuned) at each position whose hidden states are given ([n, hidden])."""
    dtype = compute_dtype(tuned_hidden.device, weight)
    return KLToBase.apply(
        tuned_hidden.to(dtype), base_hidden.to(dtype), weight.to(dtype), CHUNK_TOKENS
    )


def mean_kl(peft_model, tuned_hidden, base_at, base_hidden) -> torch.Tensor:
    """Mean KL(base ‖ tuned) over the positions that have a row in `base_hidden` (`base_at`
    ≥ 0; tuned_hidden: [batch, tokens, hidden], base_at: [batch, tokens]); 0 without any."""
    where = base_at >= 0
    if not where.any():
        return tuned_hidden.new_zeros(())
    tuned = tuned_hidden[where]
    base = base_hidden[base_at[where].cpu()].to(tuned.device)
    weight = peft_model.get_output_embeddings().weight
    return kl_per_position(tuned, base, weight).mean()


def base_hidden_states(model, dataset, packed: bool):
    """The base's last hidden states at every position that predicts a replay answer token
    ([positions, hidden], on the CPU), and `dataset` with its `base_at` column (each such
    position's row; -1 elsewhere). `model` is the PEFT model: its adapter is disabled; each
    distinct replay example runs alone (no padding; with `packed`, as a packed row of one
    document, the attention training runs), so its states are the ones the base has in any
    packed row or padded batch."""
    body = model.get_base_model().base_model
    device = next(model.parameters()).device
    rows, states, base_at, size, start = {}, [], [], 0, time.perf_counter()
    training = model.training
    model.eval()  # the base as it answers: no dropout
    with torch.no_grad(), model.disable_adapter():
        for record in dataset:
            ids, marks = record["input_ids"], record[REPLAY]
            predicts = [p for p in range(len(ids) - 1) if marks[p + 1] == ANSWER]
            if not predicts:
                base_at.append([-1] * len(ids))
                continue
            key = tuple(ids)
            if key not in rows:
                hidden = body(**one_example(ids, device, packed), use_cache=False)
                hidden = hidden.last_hidden_state[0]
                rows[key], size = size, size + len(predicts)
                states.append(hidden[predicts].cpu())
            first, at = rows[key], [-1] * len(ids)
            for i, p in enumerate(predicts):
                at[p] = first + i
            base_at.append(at)
    model.train(training)
    table = torch.cat(states) if states else torch.zeros((0, body.config.hidden_size))
    print(
        f"ftservice: kl_to_base: the base's states at {len(table)} replay answer tokens of "
        f"{len(rows)} examples ({table.nbytes / 2**20:.1f} MiB, on the CPU) in "
        f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True,
    )  # fmt: skip
    return table, with_base_at(dataset, base_at)


def with_base_at(dataset, base_at: list[list[int]] | None = None):
    """`dataset` with its `base_at` column (None: -1 everywhere, for data that computes no
    KL). A fresh fingerprint: hashing the table would go through dill, which prints the
    bytecode it inspects in a Ray worker."""
    import uuid

    if base_at is None:
        base_at = [[-1] * len(ids) for ids in dataset["input_ids"]]
    return dataset.add_column(BASE_AT, base_at, new_fingerprint=uuid.uuid4().hex)


def one_example(ids: list[int], device, packed: bool) -> dict:
    """The model's inputs for one example alone: a padding-free packed row of one document
    when training packs (TRL's collator's keys), else a batch of one."""
    inputs = {"input_ids": torch.tensor([ids], device=device)}
    if packed:
        n = len(ids)
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        inputs |= {
            "position_ids": torch.arange(n, device=device)[None], "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu, "max_length_q": n, "max_length_k": n,
        }  # fmt: skip
    return inputs


def pack_with_marks(dataset, max_length: int, seed: int):
    """TRL's bfd packing of input_ids, labels, the replay marks and the base's rows together
    (TRL's own packing keeps input_ids and labels only)."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset.shuffle(seed=seed), max_length, "bfd")


class ReplayMarks:
    """Wraps TRL's collator: the marks (padded with 0) and the base's rows (padded with -1)
    collated as the labels are (one row when padding-free)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        from trl.trainer.sft_trainer import pad

        columns = {c: [torch.tensor(e.pop(c)) for e in examples] for c in (REPLAY, BASE_AT)}
        batch = self.collator(examples)
        for column, fill in ((REPLAY, 0), (BASE_AT, -1)):
            values = columns[column]
            if self.collator.padding_free:
                values = [torch.cat(values)]
            batch[column] = pad(
                values, padding_value=fill, padding_side="right",
                pad_to_multiple_of=self.collator.pad_to_multiple_of,
            )  # fmt: skip
        return batch


class KLToBaseTrainer(SFTTrainer):
    """SFTTrainer whose loss adds kl_to_base × KL(base ‖ tuned) on the replay tokens, the
    base's hidden states there read from `base_hidden` (rows named by `base_at`)."""

    kl_to_base: float = 0.0
    base_hidden: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(REPLAY)
        base_at = inputs.pop(BASE_AT)
        peft_model = self.accelerator.unwrap_model(model)
        body = peft_model.get_base_model().base_model
        kept = {}

        def keep(module, args, output):
            kept.setdefault("hidden", output.last_hidden_state)

        hook = body.register_forward_hook(keep)
        try:
            loss = super().compute_loss(model, inputs, False, num_items_in_batch)
        finally:
            hook.remove()
        if not self.model.training:
            return loss
        kl = mean_kl(peft_model, kept["hidden"], base_at, self.base_hidden)
        self._metrics["train"]["kl_to_base"].append(kl.item())
        if num_items_in_batch is not None:  # TRL's loss is summed over accumulation steps
            kl = kl / self.current_gradient_accumulation_steps
        return loss + self.kl_to_base * kl
