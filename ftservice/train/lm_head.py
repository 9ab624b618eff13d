"""The LM head only where the loss looks, for adapters (whose head is frozen).

TRL's SFTTrainer patches the model with a chunked "fused" head: `model(..., labels=...,
fused_lm_head=True)` returns per-token log-probabilities, entropy and top-1 hits without
building the `[tokens, vocab]` logits. On CUDA it scores only the positions that have a
label; elsewhere it scores every position (prompt tokens included, the completion-only
loss then ignores them), in float32 matmuls, and recomputes each tile in the backward.

`label_only_head` replaces that forward with one that, for a frozen head:
- gathers the hidden states of the positions with a label (the rest never reach the head);
- projects them in chunks of tokens in the training dtype (bf16 on the matmul units), with
  the softmax in float32;
- takes the gradient with respect to each hidden state in the same pass, as Liger's fused
  linear cross-entropy does: the log-probability of token t at position i depends only on
  h_i, so d log p_i / d h_i = (e_t - p_i) W is kept (tokens × hidden) and the backward
  only scales it. Nothing is recomputed and no chunk's logits outlive the chunk.

It returns TRL's `FusedCausalLMOutput`, so TRL's loss, its entropy and accuracy metrics
and its token count are unchanged. A trained head (full fine-tuning, `lm_head` in the
adapter) keeps TRL's own forward.
"""

from __future__ import annotations

import functools
import types

import torch
from trl.trainer.utils import FusedCausalLMOutput

CHUNK_TOKENS = 1024  # a chunk's float32 logits: 1024 × vocab × 4 bytes (200 MB at 49k)


class LabelLogProbs(torch.autograd.Function):
    """Log-probabilities of `targets` under `hidden @ weight.T`, with entropy and top-1 hits
    (no gradient), in chunks of tokens; the gradient w.r.t. `hidden` is made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.size(0)
        log_probs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(log_probs)
        is_top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        jacobian = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            z = (h @ weight.T).float()
            log_z = torch.logsumexp(z, dim=-1)
            target_z = z.gather(1, t[:, None]).squeeze(1)
            log_probs[start : start + chunk] = target_z - log_z
            is_top1[start : start + chunk] = z.amax(-1) <= target_z
            log_p = z.sub_(log_z[:, None])  # in place: z is not needed again
            p = log_p.exp()
            entropy[start : start + chunk] = -torch.linalg.vecdot(p, log_p)
            if jacobian is not None:
                p.neg_().scatter_add_(1, t[:, None], torch.ones_like(p[:, :1]))  # e_t - p
                jacobian[start : start + chunk] = p.to(weight.dtype) @ weight
        ctx.save_for_backward(jacobian)
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, grad_top1):
        (jacobian,) = ctx.saved_tensors
        grad_hidden = None
        if jacobian is not None:
            grad_hidden = grad_log_probs[:, None].to(jacobian.dtype) * jacobian
        return grad_hidden, None, None, None


def compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def label_only_head(model) -> bool:
    """Replace TRL's fused head of `model` (a PreTrainedModel that `add_fused_lm_head`
    patched) with the label-only one while its head is frozen; False where it is trained."""
    head = model.get_output_embeddings()
    if head is None or head.weight.requires_grad or head.bias is not None:
        return False
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        return False  # softcapped logits (Gemma 2) keep TRL's kernel, which applies it
    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        lm_head = self.get_output_embeddings()
        if not fused_lm_head or lm_head.weight.requires_grad:
            return trl_forward(
                *args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                **kwargs,
            )  # fmt: skip
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        weight = lm_head.weight
        dtype = compute_dtype(hidden.device, weight)
        log_probs, entropy, is_top1 = LabelLogProbs.apply(
            hidden[mask].to(dtype), weight.to(dtype), shift_labels[mask], CHUNK_TOKENS
        )
        per_token = [x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (log_probs, entropy)]
        top1 = torch.zeros_like(mask).masked_scatter(mask, is_top1)
        return FusedCausalLMOutput(
            loss=-per_token[0].sum() / mask.sum().clamp(min=1),
            log_probs=per_token[0],
            entropy=per_token[1],
            is_top1=top1,
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True
