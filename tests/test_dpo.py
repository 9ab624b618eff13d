"""DPO on a real local Ray with a tiny random-init Llama, from an SFT artifact."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_replay_answers
from safetensors.torch import load_file

from ftservice.artifacts import load_artifact
from ftservice.config import SpecError, load_spec, spec_from_dict
from ftservice.evaluate import answer_stats, generate, load_prompts
from ftservice.models import build_model, load_tokenizer, resolve_model

REPO = Path(__file__).resolve().parents[1]
CPU = {"device": "cpu", "dtype": "float32", "quantization": None, "gpus": 0}
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
    from ftservice.train.dpo import dpo_config
    from ftservice.train.driver import train

    spec = spec_for(
        data["root"], tiny_llama, name="dpo-full", stage="dpo", method="full", lora=None,
        data={"train": [data["prefs"]]},
        train={"max_steps": 6, "learning_rate": 1e-3, "micro_batch_size": 4},
        scaling={"num_workers": 2, "cpus_per_worker": 1, "deepspeed": {"stage": 3}},
    )  # fmt: skip
    # TRL computes the reference's log-probabilities before training (no second model is
    # held, sharded or not); adapters keep theirs as a second adapter instead
    assert dpo_config(spec, "w", 1, False).precompute_ref_log_probs is True
    lora = spec_for(data["root"], tiny_llama, stage="dpo", data={"train": [data["prefs"]]})
    assert dpo_config(lora, "w", 1, False).precompute_ref_log_probs is False
    result = train(spec, evaluate=False)
    m = result.artifact.meta.metrics
    assert m["partition"]["world_size"] == 2
    assert m["partition"]["parameters_local"] == pytest.approx(
        m["partition"]["parameters_total"] / 2, rel=0.02
    )
    assert m["last_loss"] < m["first_loss"]
    first, last = m["preference"]["first"], m["preference"]["last"]
    assert last["rewards/margins"] > first["rewards/margins"]
    # the reference log-probabilities were computed before training, by the model as it was:
    # at the first step (before any update) the policy's log-probabilities equal them, so
    # both implicit rewards are 0 (a reference computed by another model, or left out, is not)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4), first
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-4), first
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


# Forgetting-aware DPO: the base's own answers replayed beside the pairs, through the KL term.


@pytest.fixture(scope="module")
def replay_file(chatty, tmp_path_factory) -> Path:
    """The chatty base's answers to the first 48 replay prompts, as the replay cache holds
    them (the prompts after those are held out)."""
    return write_replay_answers(chatty, tmp_path_factory.mktemp("replay"), 48, 16)


def sft_like_parent(spec, model_ref, folder: Path) -> Path:
    """An adapter folder as an SFT artifact holds one (written, not trained): B ~ N(0, 0.02),
    so the parent is not the base; A initialised from a fixed seed too."""
    torch.manual_seed(1)
    adapter = build_model(spec, model_ref)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter.save_pretrained(folder)
    return folder


def kl_dpo(data, model: Path, replay: Path | None, tmp_path: Path, steps: int,
           kl_to_base: float = 1.0):  # fmt: skip
    """The DPO trainer as a worker builds it (in-process), from an SFT-like parent adapter,
    with the replay and the KL term where `replay` is given."""
    from ftservice.train.dpo import dpo_trainer

    replay_data = {"replay": {"ratio": 0.5, "cache": str(tmp_path / "cache")}} if replay else {}
    spec = spec_for(
        tmp_path, model, name="dpo-kl", stage="dpo",
        data={"train": [data["prefs"]], **replay_data},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        train={"max_steps": steps, "learning_rate": 2e-3, "micro_batch_size": 4,
               "kl_to_base": kl_to_base if replay else 0.0},
    )  # fmt: skip
    model_ref = resolve_model(spec.model)
    parent = sft_like_parent(spec, model_ref, tmp_path / "parent")
    return dpo_trainer(
        spec, model_ref, {"name": "parent", "location": str(parent)}, load_tokenizer(model_ref),
        str(tmp_path / "work"), steps, [], replay=str(replay) if replay else None,
    )  # fmt: skip


def test_the_dpo_kl_term_is_the_bases_and_exactly_zero_for_an_adapter_whose_b_is_zero(
    chatty, replay_file, data, tmp_path
):
    trainer = kl_dpo(data, chatty, replay_file, tmp_path, steps=1)
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"} and model.active_adapter == "default"
    # 32 pairs at ratio 0.5: 32 replay examples, 4 beside each micro-batch of 4 pairs; the
    # base's states on their answers, computed before training, each read once in 8 batches
    replay = trainer.replay
    assert len(replay.records) == 32 and replay.size == 4
    assert trainer.base_hidden.shape[1] == model.config.hidden_size
    read = [at for k in range(8) for at in replay(k)["base_at"].flatten().tolist()]
    assert sorted(at for at in read if at >= 0) == list(range(len(trainer.base_hidden)))

    pairs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def kl_of() -> float:
        model.zero_grad()
        with trainer.compute_loss_context_manager():
            trainer.compute_loss(model, dict(pairs)).backward()
        return trainer._metrics["train"]["kl_to_base"][-1]

    # the parent (policy and TRL's "ref" copy alike) is not the base: the KL is not 0
    assert kl_of() > 1e-4
    # its gradient reaches the trained adapter only, never the reference copy
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".default." in n)
    assert all(g is None for n, g in grads.items() if ".ref." in n)
    # B = 0 in the trained adapter: the policy is the base (not the parent the "ref" copy
    # still holds), and the KL is exactly 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.zero_()
    assert kl_of() == 0.0


def held_out_kl_to_base(model, tokenizer, prompts) -> float:
    """Mean KL(base ‖ model) on the base's greedy answers to `prompts` (as evaluation's
    forgetting report measures it), the base being the model with every adapter disabled."""

    @contextlib.contextmanager
    def base_view():
        with model.disable_adapter():
            yield model

    model.eval()
    with base_view() as base:
        answers = generate(base, tokenizer, prompts, 16)
    return answer_stats(model, tokenizer, prompts, answers, base=base_view)["kl_from_base"]


def test_the_kl_term_keeps_dpo_near_the_base_while_the_preference_is_learned(
    chatty, replay_file, data, tmp_path
):
    held_out = load_prompts(str(REPO / "data/general/replay.jsonl"))[48:64]
    results = {}
    for kl_to_base in (0.0, 20.0):
        trainer = kl_dpo(
            data, chatty, replay_file if kl_to_base else None, tmp_path / str(kl_to_base),
            steps=6, kl_to_base=kl_to_base,
        )  # fmt: skip
        trainer.train()
        logged = [h for h in trainer.state.log_history if "rewards/margins" in h]
        kl = held_out_kl_to_base(trainer.model, trainer.processing_class, held_out)
        results[kl_to_base] = {"kl": kl, "logged": logged}
    plain, kept = results[0.0], results[20.0]
    # the same steps, seed and pairs: the term keeps the held-out prompts' KL far lower
    assert kept["kl"] < 0.5 * plain["kl"], results
    # while the preference is still learned
    first, last = kept["logged"][0], kept["logged"][-1]
    assert last["rewards/margins"] > first["rewards/margins"]
    assert last["rewards/accuracies"] >= 0.75
    assert kept["logged"][-1]["kl_to_base"] < kept["logged"][0]["kl_to_base"]
    assert not any("kl_to_base" in h for h in plain["logged"])  # off: not computed


def test_forgetting_aware_dpo_needs_adapters_and_the_kl_term(data, tmp_path):
    def spec_file(**sections) -> Path:
        body = {"name": "x", "stage": "dpo", "model": {"name": "smollm2-135m-instruct"},
                "data": {"train": [data["prefs"]]}, **sections}  # fmt: skip
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    replay = {"train": [data["prefs"]], "replay": {"ratio": 0.2}}
    spec = load_spec(spec_file(data=replay, train={"kl_to_base": 1.0}))
    assert spec.stage == "dpo" and spec.train.kl_to_base == 1.0 and spec.data.replay.ratio == 0.2

    def refused(**sections) -> str:
        path = spec_file(**sections)
        with pytest.raises(SpecError) as e:
            load_spec(path)
        return str(e.value)

    # replay without the KL term: the base's answers would have nothing to teach through
    message = refused(data=replay)
    line = (tmp_path / "spec.yaml").read_text().splitlines().index("  replay:") + 1
    assert message.startswith(f"{tmp_path / 'spec.yaml'}:{line}: data.replay: ")
    assert "stage is 'dpo'" in message and "set train.kl_to_base" in message
    # full fine-tuning has no adapter to disable for the base
    message = refused(method="full", data=replay, train={"kl_to_base": 1.0})
    assert "train.kl_to_base: " in message and "method: lora or qlora" in message
    # the KL term without replay: no tokens to take it on
    message = refused(train={"kl_to_base": 1.0})
    assert "train.kl_to_base: " in message and "data.replay is not set" in message
