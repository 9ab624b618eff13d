"""Attention for packed rows: each document of the row attends only to itself, in one batched
matmul, instead of SDPA over the whole row under a block-diagonal mask.

Padding-free packing concatenates the micro-batch's examples into one row and TRL's
collator hands the model each example's bounds (`cu_seq_lens_q`). Flash attention's varlen
kernel reads them; SDPA does not, so transformers builds a block-diagonal mask and SDPA
computes the whole row × row score matrix, most of it masked: with ten examples of ~50
tokens in a row of 512 that is ten times the attention work, and a third of a CPU step.
`document_attention` lays the row's examples out as a batch, each right-padded to the longest,
and runs causal attention over it as two matmuls (the heads that share a key/value head
stacked, so nothing is repeated): what the varlen kernel computes. Measured on 2 CPU
threads, ten 80-token examples of SmolLM2's attention: SDPA's flash kernel 4 ms forward and
17 ms backward over that batch (its backward costs the same for one 512-token row), these
matmuls 1.5 ms and 2 ms. Documents longer than 512 tokens go to SDPA's causal kernel on
the same layout, so no length² score matrix is kept for the backward. Anything that is not
such a packed row (padded batches, generation with a cache) goes to transformers' SDPA with
its mask unchanged.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DOCUMENT_ATTENTION = "ftservice_document"
MATMUL_MAX_LENGTH = 512  # longer documents go to SDPA's kernels, whose memory is linear


def document_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """`AttentionInterface` function: per-document causal attention for a packed row."""
    cu_seq_lens_k = kwargs.pop("cu_seq_lens_k", None)
    packed = (
        cu_seq_lens_q is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == int(cu_seq_lens_q[-1])
        and (cu_seq_lens_k is None or torch.equal(cu_seq_lens_k, cu_seq_lens_q))
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    # The row's documents as a batch, each right-padded to the longest: causal attention
    # keeps every real token's query off the padding after it, and the padded queries'
    # outputs are dropped, so one call computes every document alone.
    sizes = cu_seq_lens_q.diff()
    lengths = sizes.tolist()
    real = torch.arange(max(lengths), device=query.device) < sizes[:, None]

    def documents(x):  # [1, heads, row, dim] -> [documents, heads, width, dim]
        parts = x[0].transpose(0, 1).split(lengths)  # slices: their backward is a copy
        return pad_sequence(parts, batch_first=True).transpose(1, 2)

    q, k, v = documents(query), documents(key), documents(value)
    if real.shape[1] <= MATMUL_MAX_LENGTH:
        out = causal_attention(q, k, v, kwargs.get("scaling"), kwargs.get("dropout", 0.0))
        out = out.transpose(1, 2)
    else:  # long documents: SDPA's kernels never hold the length² scores
        out, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)
    return out[real].unsqueeze(0), None  # [1, row, heads, dim], as SDPA's


def causal_attention(query, key, value, scaling: float | None, dropout: float = 0.0):
    """Causal attention of short sequences as two matmuls and a float32 softmax; the query
    heads that share a key/value head are stacked along the rows, so keys and values are
    never repeated. [batch, heads, length, dim] in and out."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    stacked = query.reshape(batch, key.shape[1], groups * length, dim)
    scores = (stacked @ key.transpose(-1, -2)).float() * scaling
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.masked_fill(future.repeat(groups, 1), float("-inf"))
    weights = scores.softmax(-1).to(value.dtype)
    if dropout:
        weights = torch.nn.functional.dropout(weights, dropout, training=True)
    return (weights @ value).reshape(batch, heads, length, dim)


AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)
AttentionMaskInterface.register(DOCUMENT_ATTENTION, sdpa_mask)  # the fallback's mask, as SDPA's


def use_document_attention(model) -> bool:
    """Switch `model` (a PreTrainedModel, under PEFT or not) to document attention where it
    runs SDPA; False where it runs another attention (eager, flash, flex), kept as it is."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(DOCUMENT_ATTENTION)
    return model.config._attn_implementation == DOCUMENT_ATTENTION
