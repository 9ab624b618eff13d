"""Packing is correct: packed examples give the logits they give alone, as SFTTrainer feeds them."""

from __future__ import annotations

import itertools

import pytest
import torch

from ftservice.config import spec_from_dict
from ftservice.data.loaders import load_rows
from ftservice.models import build_model, load_tokenizer, resolve_model
from ftservice.train import sft
from ftservice.train.attention import DOCUMENT_ATTENTION, use_document_attention


@pytest.mark.parametrize("attention", ["sdpa", "documents", "documents-long"])
def test_packed_batches_give_the_logits_of_each_example_alone(
    tmp_path, tiny_llama, attention, monkeypatch
):
    from trl import SFTTrainer

    spec = spec_from_dict(
        {
            "name": "pack",
            "model": {"name": str(tiny_llama)},
            "data": {"train": ["data/domain/train.jsonl"], "max_seq_length": 128, "packing": True},
            "method": "lora",
            "train": {"micro_batch_size": 2, "precision": "fp32"},
        }
    )
    model_ref = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_ref)
    rows = load_rows(spec.data.train)[:24]
    dataset = sft.tokenized(rows, tokenizer, 128, completion_only=True)
    model = build_model(spec, model_ref)
    trainer = SFTTrainer(
        model=model,
        args=sft.sft_config(spec, str(tmp_path), max_steps=1, has_eval=False),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))

    # padding-free: one row, no attention mask, positions restarting at every example
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    positions = batch["position_ids"][0]
    starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
    assert len(starts) - 1 >= 4, "several examples share the packed row"
    assert len(positions) > 128, "two bins of up to 128 tokens each, concatenated"

    inputs = {k: v for k, v in batch.items() if k != "labels"}  # with the examples' bounds
    if attention == "documents-long":  # documents over the matmul cap take SDPA's kernel
        monkeypatch.setattr("ftservice.train.attention.MATMUL_MAX_LENGTH", 8)
    if attention.startswith("documents"):
        assert use_document_attention(model.get_base_model())
        assert model.config._attn_implementation == DOCUMENT_ATTENTION
    model.eval()
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        for a, b in itertools.pairwise(starts):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-4, rtol=1e-4)

    # the loss never crosses an example boundary, and only assistant tokens count
    labels = batch["labels"][0]
    assert (labels[torch.tensor(starts[:-1])] == -100).all()
    masked = sum(int((labels[a:b] == -100).sum()) for a, b in itertools.pairwise(starts))
    assert 0 < masked < len(labels)
