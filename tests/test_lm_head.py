"""The label-only LM head gives TRL's loss, metrics and gradients from the labelled positions."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils

from ftservice.config import spec_from_dict
from ftservice.models import load_tokenizer, resolve_model
from ftservice.train import lm_head, sft


def adapter_trainer(tmp_path, model_path, precision: str):
    spec = spec_from_dict(
        {
            "name": "head",
            "model": {"name": str(model_path)},
            "data": {"train": ["data/domain/train.jsonl"], "max_seq_length": 128,
                     "packing": True},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {"micro_batch_size": 2, "precision": precision},
        }
    )  # fmt: skip
    model_ref = resolve_model(spec.model)
    return sft.sft_trainer(spec, model_ref, None, load_tokenizer(model_ref), str(tmp_path), 1, [])


def loss_and_grads(trainer, batch, fused):
    """The trainer's loss, its metrics and the adapter's gradients for one batch, through
    the given fused-head forward."""
    inner = trainer.model.get_base_model()
    inner.forward = fused.__get__(inner)
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_label_only_head_gives_trls_loss_metrics_and_gradients(tmp_path, tiny_llama, precision):
    trainer = adapter_trainer(tmp_path, tiny_llama, precision)
    inner = trainer.model.get_base_model()
    ours = inner.forward.__func__
    assert ours.__code__.co_filename == lm_head.__file__, "the recipe installs the label-only head"
    # TRL's own fused head, patched onto a fresh bound forward of the same model
    inner.forward = type(inner).forward.__get__(inner)
    trl.trainer.utils.add_fused_lm_head(inner, outputs=("log_probs", "entropy", "is_top1"))
    trl_fused = inner.forward.__func__

    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at init would leave every A's gradient zero
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"].numel() // 2, "most positions carry no label"

    seen = []
    real_apply = lm_head.LabelLogProbs.apply
    lm_head.LabelLogProbs.apply = lambda h, *a: seen.append(h.shape[0]) or real_apply(h, *a)
    try:
        loss, metrics, grads = loss_and_grads(trainer, batch, ours)
    finally:
        lm_head.LabelLogProbs.apply = real_apply
    trl_loss, trl_metrics, trl_grads = loss_and_grads(trainer, batch, trl_fused)

    assert seen == [labelled], "only the labelled positions reach the head"
    tol = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    torch.testing.assert_close(loss, trl_loss, atol=tol, rtol=tol)
    assert metrics.keys() == trl_metrics.keys() == {"entropy", "mean_token_accuracy"}
    assert metrics["entropy"] == pytest.approx(trl_metrics["entropy"], rel=tol, abs=tol)
    assert metrics["mean_token_accuracy"] == pytest.approx(trl_metrics["mean_token_accuracy"])
    assert grads.keys() == trl_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        scale = trl_grads[name].abs().max().item()
        assert scale > 0, name
        err = (grad - trl_grads[name]).abs().max().item()
        assert err <= tol * max(scale, 1e-8), f"{name}: {err} against {scale}"


def test_a_trained_head_keeps_trls_forward(tmp_path, tiny_llama):
    trainer = adapter_trainer(tmp_path, tiny_llama, "fp32")
    inner = trainer.model.get_base_model()
    inner.get_output_embeddings().weight.requires_grad_(True)
    inner.forward = type(inner).forward.__get__(inner)
    trl.trainer.utils.add_fused_lm_head(inner, outputs=("log_probs",))
    trl_fused = inner.forward
    assert lm_head.label_only_head(inner) is False
    assert inner.forward == trl_fused
