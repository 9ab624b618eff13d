"""Forgetting-aware fine-tuning: the base's own answers replayed, and the KL to the base on
their tokens in the same step (`data.replay`, `train.kl_to_base`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, write_replay_answers
from trl.experimental.gkd import GKDTrainer

from ftservice.config import SpecError, spec_from_dict
from ftservice.evaluate import _prompt, answer_stats, generate, load_prompts, read_jsonl
from ftservice.models import load_causal_lm, load_tokenizer, resolve_model
from ftservice.train import sft
from ftservice.train.attention import DOCUMENT_ATTENTION
from ftservice.train.driver import train
from ftservice.train.kl_to_base import ANSWER, KLToBase
from ftservice.train.replay import ensure_replay, mix_replay, replay_rows

REPO = Path(__file__).resolve().parent.parent
CPU = {"device": "cpu", "dtype": "float32", "quantization": None, "gpus": 0}


@pytest.fixture(scope="module")
def other_chatty(builtin_model, tmp_path_factory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("other-chatty"), builtin_model.path, seed=1, initializer_range=0.1
    )


@pytest.fixture(scope="module")
def domain_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("domain") / "train.jsonl"
    rows = read_jsonl(REPO / "data/domain/train.jsonl")[:48]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def replay_file(chatty, tmp_path_factory) -> Path:
    """The chatty base's answers to 64 replay prompts, as the cache holds them."""
    return write_replay_answers(chatty, tmp_path_factory.mktemp("replay"), 64, 24)


def spec_for(model: Path, data: Path, tmp_path: Path, **train) -> object:
    return spec_from_dict(
        {
            "name": "keep",
            "model": {"name": str(model)},
            "data": {"train": [str(data)], "max_seq_length": 128, "packing": True,
                     "replay": {"ratio": 0.3, "max_new_tokens": 12,
                                "cache": str(tmp_path / "cache")}},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"micro_batch_size": 2, "precision": "fp32", "learning_rate": 5e-3,
                      "warmup_ratio": 0, "logging_steps": 5, **train},
            "scaling": {"num_workers": 1, "cpus_per_worker": 2},
            "eval": {"domain": None, "general": None},
            "output": {"registry": str(tmp_path / "registry"),
                       "storage_path": str(tmp_path / "runs")},
        }
    )  # fmt: skip


@pytest.mark.slow
def test_replay_is_the_bases_own_answers_cached_per_base(
    local_ray, chatty, other_chatty, domain_file, tmp_path
):
    prompts_file = tmp_path / "prompts.jsonl"
    lines = (REPO / "data/general/replay.jsonl").read_text().splitlines()[:6]
    prompts_file.write_text("\n".join(lines) + "\n")
    spec = spec_for(chatty, domain_file, tmp_path)
    spec.data.replay.prompts = str(prompts_file)
    base = resolve_model(spec.model)
    made = ensure_replay(spec, base)
    assert made.made and made.examples == 6
    # the base's greedy answers, as the base itself gives them here
    tokenizer = load_tokenizer(base)
    prompts = load_prompts(str(prompts_file))
    direct = generate(load_causal_lm(base).eval(), tokenizer, prompts, 12)
    cached = [r["messages"][-1]["content"] for r in replay_rows(made.location)]
    assert cached == direct and all(cached)
    assert [r["messages"][:-1] for r in replay_rows(made.location)] == prompts
    # the same base again: read from the cache, not made again
    stamp = Path(made.location).stat().st_mtime_ns
    again = ensure_replay(spec, base)
    assert (again.made, again.location, again.fingerprint) == (
        False,
        made.location,
        made.fingerprint,
    )
    assert Path(made.location).stat().st_mtime_ns == stamp
    # another base: another fingerprint, another file, its own answers
    other_spec = spec_for(other_chatty, domain_file, tmp_path)
    other_spec.data.replay.prompts = str(prompts_file)
    other = ensure_replay(other_spec, resolve_model(other_spec.model))
    assert other.made and other.fingerprint != made.fingerprint
    assert other.location != made.location
    assert [r["messages"][-1]["content"] for r in replay_rows(other.location)] != cached
    # longer answers are other answers
    spec.data.replay.max_new_tokens = 20
    longer = ensure_replay(spec, base)
    assert longer.fingerprint not in (made.fingerprint, other.fingerprint)
    # a Ray Train run mixes them in and takes the KL on them; its artifact names the replay
    spec.train.kl_to_base, spec.train.max_steps = 1.0, 3
    artifact = train(spec, evaluate=False).artifact
    replay = artifact.meta.metrics["replay"]
    assert replay == {"fingerprint": longer.fingerprint, "location": longer.location,
                      "examples": 6}  # fmt: skip
    logged = json.loads((artifact.path / "log_history.json").read_text())
    kl = [h["kl_to_base"] for h in logged if "kl_to_base" in h]
    assert len(kl) >= 1 and all(v >= 0 for v in kl)


def test_replay_rows_are_the_specs_share_of_the_training_examples():
    rows = [{"kind": "chat", "id": str(i)} for i in range(30)]
    replay = [{"kind": "chat", "id": f"r{i}", "replay": True} for i in range(4)]
    mixed = mix_replay(rows, replay, 0.25, seed=0)
    picked = [r["id"] for r in mixed if r.get("replay")]
    assert len(mixed) == 40 and len(picked) == 10  # 10 of 40: a quarter
    assert sorted(picked[:4]) == ["r0", "r1", "r2", "r3"]  # each once before any again
    assert mix_replay(rows, replay, 0.25, seed=0) == mixed  # seeded


def test_the_chunked_kl_is_trls_gkd_divergence_with_its_gradient():
    torch.manual_seed(0)
    weight = torch.randn(300, 16, dtype=torch.float64)
    tuned = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    base = torch.randn(37, 16, dtype=torch.float64)
    ours = KLToBase.apply(tuned, base, weight, 8)  # 5 chunks
    ours.sum().backward()
    ours_grad = tuned.grad.clone()
    tuned.grad = None
    # TRL's GKD loss with beta = 0 is KL(teacher ‖ student): here the base is the teacher
    trls = GKDTrainer.generalized_jsd_loss(
        (tuned @ weight.T)[None], (base @ weight.T)[None], beta=0.0, reduction="none"
    ).sum(-1)[0]
    trls.sum().backward()
    torch.testing.assert_close(ours, trls.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, tuned.grad, rtol=1e-4, atol=1e-5)  # float32 softmax
    assert (ours > 0).all()


def kl_trainer(spec, chatty, replay_file, tmp_path, steps):
    ref = resolve_model(spec.model)
    return sft.sft_trainer(
        spec, ref, None, load_tokenizer(ref), str(tmp_path / "work"), steps, [],
        replay=str(replay_file),
    )  # fmt: skip


@pytest.mark.parametrize("packing", [True, False])
def test_the_kl_term_is_exactly_zero_for_an_adapter_whose_b_is_zero(
    chatty, domain_file, replay_file, tmp_path, packing
):
    spec = spec_for(chatty, domain_file, tmp_path, kl_to_base=1.0)
    spec.data.packing = packing
    trainer = kl_trainer(spec, chatty, replay_file, tmp_path, 1)
    # the base's states on the replay answers were computed before training, in the
    # attention training runs (per document where packed)
    attention = DOCUMENT_ATTENTION if packing else "sdpa"
    assert trainer.model.config._attn_implementation == attention
    assert trainer.base_hidden.shape[1] == trainer.model.config.hidden_size
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
    at = torch.cat([b["base_at"][b["base_at"] >= 0] for b in batches])
    assert set(at.tolist()) == set(range(len(trainer.base_hidden))), "each row read, none past"
    replayed = [b for b in batches if (b["replay"][:, 1:] == ANSWER).any()]
    assert 0 < len(replayed) < len(batches), "some batches hold replay answers, some none"
    for b in batches:  # replay tokens teach through the KL alone: no cross-entropy label
        assert (b["labels"][b["replay"].bool()] == -100).all()
    assert sum(int((b["labels"][b["replay"] == 0] != -100).sum()) for b in batches) > 0

    def kl_of(batch) -> float:
        with trainer.compute_loss_context_manager():
            trainer.compute_loss(trainer.model, dict(batch))
        return trainer._metrics["train"]["kl_to_base"][-1]

    assert [kl_of(b) for b in replayed] == [0.0] * len(replayed)  # B = 0: the base itself
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert all(kl_of(b) > 1e-4 for b in replayed)


def drift_and_domain_loss(model, tokenizer, held_out, domain_rows) -> tuple[float, float]:
    model.eval()

    @contextlib.contextmanager
    def base_view():
        with model.disable_adapter():
            yield model

    with base_view() as base:
        base_answers_ = generate(base, tokenizer, held_out, 24)
    drift = answer_stats(model, tokenizer, held_out, base_answers_, base=base_view)
    prompts = [_prompt(r) for r in domain_rows]
    domain = answer_stats(model, tokenizer, prompts, [r["output"] for r in domain_rows])
    return drift["kl_from_base"], domain["loss"]


@pytest.mark.slow
def test_the_kl_term_keeps_the_model_near_its_base_while_the_domain_is_learned(
    chatty, domain_file, replay_file, tmp_path
):
    held_out = load_prompts(str(REPO / "data/general/prompts.jsonl"))[:16]
    domain_rows = read_jsonl(domain_file)
    results = {}
    for coef in (0.0, 5.0):
        spec = spec_for(chatty, domain_file, tmp_path / str(coef), kl_to_base=coef)
        trainer = kl_trainer(spec, chatty, replay_file, tmp_path / str(coef), 100)
        if coef == 0.0:
            with trainer.model.disable_adapter():
                _, before = drift_and_domain_loss(
                    trainer.model, trainer.processing_class, held_out[:1], domain_rows
                )
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        drift, domain = drift_and_domain_loss(
            trainer.model, trainer.processing_class, held_out, domain_rows
        )
        results[coef] = {"drift": drift, "domain": domain, "logged": logged}
    plain, kept = results[0.0], results[5.0]
    # the same steps, the same data: the term keeps the held-out prompts' KL far lower
    assert kept["drift"] < 0.6 * plain["drift"], results
    # while the training loss still falls and the domain answers are still learned
    assert kept["logged"][-1]["loss"] < kept["logged"][0]["loss"] - 1.0
    assert kept["domain"] < before - 2.0 and kept["domain"] < plain["domain"] + 0.5
    assert all(h["kl_to_base"] >= 0 for h in kept["logged"])
    assert not any("kl_to_base" in h for h in plain["logged"])  # off: not computed


def test_replay_and_the_kl_term_are_refused_where_they_cannot_work(domain_file, tmp_path):
    def problems(**overrides) -> str:
        body = {"name": "x", "data": {"train": [str(domain_file)]}, **overrides}
        with pytest.raises(SpecError) as e:
            spec_from_dict(body)
        return str(e.value)

    no_replay = problems(train={"kl_to_base": 1.0})
    assert "train.kl_to_base" in no_replay and "data.replay" in no_replay
    full = problems(method="full", train={"kl_to_base": 1.0},
                    data={"train": [str(domain_file)], "replay": {}})  # fmt: skip
    assert "train.kl_to_base" in full and "method: lora or qlora" in full
    dpo = problems(stage="dpo", data={"train": [str(domain_file)], "replay": {}})
    assert "data.replay" in dpo and "stage is 'dpo'" in dpo


def test_the_bases_own_numbers_are_computed_once_per_base_and_sets(
    chatty, other_chatty, monkeypatch, tmp_path
):
    from ftservice.evaluate import evaluate_artifact_folder

    monkeypatch.setenv("FTSERVICE_CACHE", str(tmp_path / "cache"))
    domain, general = REPO / "data/domain/valid.jsonl", REPO / "data/general/valid.jsonl"

    def evaluate(base: Path, fingerprint: str, limit: int = 4) -> dict:
        # a full model (the other tiny Llama) evaluated beside a base
        return evaluate_artifact_folder(
            str(other_chatty), str(base), False, str(domain), str(general), 8, limit, None, 2,
            None, fingerprint,
        )  # fmt: skip

    def numbers(report: dict) -> dict:
        return {k: v for k, v in report.items() if k not in ("memory", "base_numbers_cached")}

    first = evaluate(chatty, "base-a")
    assert first["base_numbers_cached"] is False and first["forgetting"]["answer_tokens"] > 0
    again = evaluate(chatty, "base-a")
    assert again["base_numbers_cached"] is True and numbers(again) == numbers(first)
    assert len(list((tmp_path / "cache" / "eval-base").iterdir())) == 1
    # another base (its fingerprint), or other sets: computed afresh
    other = evaluate(other_chatty, "base-b")
    assert other["base_numbers_cached"] is False
    assert other["forgetting"]["kl_from_base"] == pytest.approx(0, abs=1e-6)  # itself
    assert evaluate(chatty, "base-a", limit=3)["base_numbers_cached"] is False
