"""KL(base ‖ tuned) on the replay tokens, in the training step (`train.kl_to_base`).

Reads top to bottom:
- the replay examples carry a `replay` mark on each of their tokens (ANSWER on the tokens of
  the base's answer, PROMPT on the rest) and no cross-entropy label: they teach through the
  KL term alone, since the cross-entropy on the base's greedy answer pulls towards a
  sharpened copy of the base (the forgetting sweep's `kl_to_base: 0` trials), the KL
  towards its whole distribution; packing them (TRL's best-fit-decreasing packing, done
  here so that the mark is packed with the tokens) and collating keep the mark beside the
  labels;
- the step runs TRL's SFT loss as usual, and a hook on the model's body keeps its last
  hidden states;
- the base is the same model with its adapter disabled (no second copy): it runs, without
  gradients, on the replay examples only (their documents of a packed row, or their rows
  of a padded batch), which is exact since no example attends to another;
- on each position that predicts a replay answer token, KL(p_base ‖ p_tuned) over the whole
  vocabulary, through the frozen LM head, in chunks of tokens (`KLToBase`, below): TRL's
  GKD `generalized_jsd_loss` with beta=0 is this divergence, but it takes both models'
  `[tokens, vocab]` logits and keeps them for the backward, and the tuned model's exist
  nowhere here (the label-only head never builds them);
- loss = SFT loss + kl_to_base × mean KL over those positions. The KL is logged as
  `kl_to_base` beside the loss.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from ftservice.train.lm_head import CHUNK_TOKENS, compute_dtype

REPLAY = "replay"  # the per-token mark column: 0 off replay examples, else PROMPT or ANSWER
PROMPT, ANSWER = 1, 2


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


def pack_with_marks(dataset, max_length: int, seed: int):
    """TRL's bfd packing of input_ids, labels and the replay mark together (TRL's own
    packing keeps input_ids and labels only)."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset.shuffle(seed=seed), max_length, "bfd")


class ReplayMarks:
    """Wraps TRL's collator: the marks collated as the labels are (one row when
    padding-free, else padded with 0)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        from trl.trainer.sft_trainer import pad

        marks = [torch.tensor(e.pop(REPLAY)) for e in examples]
        batch = self.collator(examples)
        if self.collator.padding_free:
            marks = [torch.cat(marks)]
        batch[REPLAY] = pad(
            marks, padding_value=0, padding_side="right",
            pad_to_multiple_of=self.collator.pad_to_multiple_of,
        )  # fmt: skip
        return batch


class KLToBaseTrainer(SFTTrainer):
    """SFTTrainer whose loss adds kl_to_base × KL(base ‖ tuned) on the replay tokens."""

    kl_to_base: float = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        marks = inputs.pop(REPLAY)
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
        tuned, base = self.replay_hidden(peft_model, body, inputs, marks, kept["hidden"])
        if tuned.size(0) == 0:
            kl = loss.new_zeros(())
        else:
            weight = peft_model.get_output_embeddings().weight
            kl = kl_per_position(tuned, base, weight).mean()
        self._metrics["train"]["kl_to_base"].append(kl.item())
        if num_items_in_batch is not None:  # TRL's loss is summed over accumulation steps
            kl = kl / self.current_gradient_accumulation_steps
        return loss + self.kl_to_base * kl

    @staticmethod
    def replay_hidden(peft_model, body, inputs, marks, hidden):
        """(tuned, base) last hidden states at the positions that predict a replay answer
        token; the base runs on the replay examples alone, adapter disabled, no gradient."""
        predicts = marks[:, 1:] == ANSWER  # position p predicts token p+1
        marks = marks.bool()
        if not predicts.any():
            empty = hidden.new_zeros((0, hidden.size(-1)))
            return empty, empty
        if "cu_seq_lens_q" in inputs:  # padding-free: one row of packed examples
            keep = marks[0]
            positions = inputs["position_ids"][:, keep]
            starts = (positions[0] == 0).nonzero().flatten()
            cu = torch.cat([starts, starts.new_tensor([positions.size(1)])]).to(torch.int32)
            kwargs = {
                "input_ids": inputs["input_ids"][:, keep], "position_ids": positions,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": int(cu.diff().max()), "max_length_k": int(cu.diff().max()),
            }  # fmt: skip
            where = predicts[0].nonzero().flatten()
            within = keep.cumsum(0)[where] - 1  # the same positions in the replay-only row
            with torch.no_grad(), peft_model.disable_adapter():
                base = body(**kwargs, use_cache=False).last_hidden_state
            return hidden[0, where], base[0, within]
        rows = marks.any(1).nonzero().flatten()  # padded batch: the replay examples' rows
        with torch.no_grad(), peft_model.disable_adapter():
            base = body(
                input_ids=inputs["input_ids"][rows],
                attention_mask=inputs["attention_mask"][rows], use_cache=False,
            ).last_hidden_state  # fmt: skip
        mask = predicts[rows]
        return hidden[rows, :-1][mask], base[:, :-1][mask]
