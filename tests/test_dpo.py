"""DPO on a real local Ray with a tiny random-init Llama, from an SFT artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftservice.artifacts import load_artifact
from ftservice.config import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """SFT examples, and preference pairs whose chosen answer is clearly better (the short
    correct answer against a long hedge)."""
    root = tmp_path_factory.mktemp("dpo-data")
    sft = (REPO / "data/domain/train.jsonl").read_text().splitlines()[:32]
    (root / "sft.jsonl").write_text("\n".join(sft) + "\n")
    prefs = (REPO / "data/preference/seeds.jsonl").read_text().splitlines()[:32]
    (root / "prefs.jsonl").write_text("\n".join(prefs) + "\n")
    return {"sft": str(root / "sft.jsonl"), "prefs": str(root / "prefs.jsonl"), "root": root}


def spec_for(root: Path, model: Path, **sections):
    spec = {
        "name": "tiny",
        "model": {"name": str(model)},
        "data": {"max_seq_length": 128},
        "lora": {"r": 8, "alpha": 16},
        "train": {"micro_batch_size": 8, "warmup_ratio": 0, "precision": "fp32"},
        "checkpoint": {"every_steps": 4, "num_to_keep": 1},
        "eval": {"domain": None, "general": None},
        "output": {"registry": str(root / "registry"), "storage_path": str(root / "runs")},
    }
    for key, value in sections.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec_from_dict(spec)


@pytest.fixture(scope="module")
def sft_artifact(local_ray, tiny_llama, data):
    from ftservice.train.driver import train

    spec = spec_for(
        data["root"], tiny_llama, name="sft", data={"train": [data["sft"]]},
        train={"max_steps": 4, "learning_rate": 5e-3},
    )  # fmt: skip
    return train(spec, evaluate=False).artifact


def dpo_spec(data, model, parent, **train):
    return spec_for(
        data["root"], model, name="dpo", stage="dpo",
        data={"train": [data["prefs"]]},
        dpo={"beta": 0.1, "parent": str(parent.path)},
        train={"max_steps": 12, "learning_rate": 2e-3, **train},
    )  # fmt: skip


def test_dpo_from_an_sft_adapter_learns_the_preference(local_ray, tiny_llama, data, sft_artifact):
    from ftservice.train.driver import train

    result = train(dpo_spec(data, tiny_llama, sft_artifact), evaluate=False)
    meta = result.artifact.meta
    assert meta.parent == sft_artifact.name
    assert meta.spec["stage"] == "dpo"
    m = meta.metrics
    assert m["global_step"] == 12
    assert m["last_loss"] < m["first_loss"] < 0.7  # starts near log 2: policy == reference
    prefs = m["preference"]
    assert prefs["last"]["rewards/margins"] > prefs["first"]["rewards/margins"]
    assert prefs["last"]["rewards/accuracies"] >= 0.75
    assert prefs["last"]["rewards/accuracies"] >= prefs["first"]["rewards/accuracies"]

    # the published adapter is the trained policy only (no reference copy), and it moved
    # away from the SFT adapter it started from
    before = load_file(sft_artifact.path / "adapter_model.safetensors")
    after = load_file(result.artifact.path / "adapter_model.safetensors")
    assert set(after) == set(before)
    assert not any(".ref." in k for k in after)
    assert [k for k in after if torch.equal(after[k], before[k])] == []
    assert load_artifact(str(result.artifact.path)).is_adapter


def test_the_lora_reference_is_an_adapter_not_a_second_model(tmp_path, tiny_llama, data):
    """Built in-process as the worker builds it: one base, the policy adapter and TRL's
    reference copy of it; no reference model."""
    from ftservice.artifacts import Artifact
    from ftservice.models import build_model, load_causal_lm, load_tokenizer, resolve_model
    from ftservice.train.dpo import dpo_trainer

    spec = spec_for(tmp_path, tiny_llama, data={"train": [data["sft"]]})
    model_ref = resolve_model(spec.model)
    start = tmp_path / "start"  # an adapter folder to start from, as an SFT artifact holds
    build_model(spec, model_ref).save_pretrained(start)
    dspec = dpo_spec(data, tiny_llama, Artifact(location=str(start), meta=None))
    trainer = dpo_trainer(
        dspec, model_ref, {"name": "start", "location": str(start)}, load_tokenizer(model_ref),
        str(tmp_path / "w"), 1, [],
    )  # fmt: skip
    assert trainer.ref_model is None
    assert set(trainer.model.peft_config) == {"default", "ref"}
    names = [n for n, _ in trainer.model.named_parameters()]
    assert any(".ref." in n for n in names) and any(".default." in n for n in names)
    base_tensors = [n for n in names if "lora_" not in n]
    assert len(base_tensors) == len(list(load_causal_lm(model_ref).parameters()))
    # the reference starts equal to the policy: DPO's implicit rewards start at 0
    for n, p in trainer.model.named_parameters():
        if ".default." in n:
            ref = dict(trainer.model.named_parameters())[n.replace(".default.", ".ref.")]
            assert torch.equal(p, ref)


def test_dpo_full_under_zero3_uses_precomputed_reference_log_probs(local_ray, tiny_llama, data):
    from ftservice.train.driver import train

    spec = spec_for(
        data["root"], tiny_llama, name="dpo-full", stage="dpo", method="full", lora=None,
        data={"train": [data["prefs"]]},
        train={"max_steps": 6, "learning_rate": 1e-3, "micro_batch_size": 4},
        scaling={"num_workers": 2, "cpus_per_worker": 1, "deepspeed": {"stage": 3}},
    )  # fmt: skip
    result = train(spec, evaluate=False)
    m = result.artifact.meta.metrics
    assert m["partition"]["world_size"] == 2
    assert m["partition"]["parameters_local"] == pytest.approx(
        m["partition"]["parameters_total"] / 2, rel=0.02
    )
    assert m["last_loss"] < m["first_loss"]
    assert m["preference"]["last"]["rewards/margins"] > m["preference"]["first"]["rewards/margins"]
    assert (result.artifact.path / "model.safetensors").is_file()


def test_dpo_resumes_when_the_driver_is_killed(tmp_path, cli_env, tiny_llama, data, sft_artifact):
    from conftest import kill_driver_then_rerun

    spec = dpo_spec(data, tiny_llama, sft_artifact)
    spec = spec.model_copy(
        update={
            "output": spec.output.model_copy(
                update={"registry": str(tmp_path / "reg"), "storage_path": str(tmp_path / "runs")}
            )
        }
    )
    meta = kill_driver_then_rerun(tmp_path, cli_env, spec)
    assert meta["metrics"]["resumed"] is True
    assert meta["metrics"]["global_step"] == 12
    assert meta["parent"] == sft_artifact.name


def test_dpo_refuses_a_parent_trained_on_another_base(
    local_ray, tiny_llama, other_tiny_llama, data, sft_artifact
):
    from ftservice.train.driver import ParentMismatch, run_name, train

    spec = dpo_spec(data, other_tiny_llama, sft_artifact)
    with pytest.raises(ParentMismatch) as caught:
        train(spec, evaluate=False)
    message = str(caught.value)
    assert str(other_tiny_llama) in message and str(tiny_llama) in message
    assert sft_artifact.meta.base_model.fingerprint[:12] in message
    assert not (Path(spec.output.storage_path) / run_name(spec)).exists()  # no worker started
    stored = json.loads((sft_artifact.path / "ftservice.json").read_text())
    assert stored == sft_artifact.meta.model_dump(mode="json")


def test_an_sft_weight_adds_trls_sft_term_on_the_chosen_answers(tmp_path, tiny_llama, data):
    from ftservice.config import spec_from_dict
    from ftservice.train.dpo import dpo_config

    base = {"name": "d", "stage": "dpo", "model": {"name": str(tiny_llama)},
            "data": {"train": [data["prefs"]]}}  # fmt: skip
    plain = dpo_config(spec_from_dict(base), str(tmp_path), 2, False)
    assert plain.loss_type == ["sigmoid"]
    rpo = dpo_config(spec_from_dict(base | {"dpo": {"sft_weight": 0.5}}), str(tmp_path), 2, False)
    assert rpo.loss_type == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 0.5]
