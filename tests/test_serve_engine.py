"""The serving engine on a tiny model with three adapters made to answer differently (written
weights, no training): one base, mixed-adapter batches equal to each request alone, LRU
eviction that really deletes, per-row caps, stops and streams."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftservice.serve.engine import Engine, GenerationRequest

PROMPTS = ["The warranty of", "Our headquarters", "Battery life is", "Colour:"]


def write_adapter(folder: Path, base: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA adapter with random non-zero B, strong enough to change greedy answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(
            r=rank, lora_alpha=16 * rank, target_modules="all-linear", init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        n: write_adapter(root / n, tiny_llama, s)
        for n, s in [("alpha", 1), ("beta", 2), ("gamma", 3)]
    }


@pytest.fixture
def engine(tiny_llama, adapters) -> Engine:
    engine = Engine(tiny_llama, max_adapters=3)
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    return engine


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def test_each_adapter_and_the_base_answer_differently(engine):
    outputs = {}
    for adapter in (None, "alpha", "beta", "gamma"):
        [gen] = engine.generate([GenerationRequest(ids(engine, PROMPTS[0]), adapter, 12)])
        outputs[adapter] = tuple(gen.token_ids)
    assert len(set(outputs.values())) == 4, outputs


def test_each_adapter_answers_exactly_as_peft_does(engine, tiny_llama, adapters):
    """The reference is PEFT itself: the adapter loaded into its own PeftModel; the slots'
    greedy tokens and logits equal it, alone and inside a mixed batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = ids(engine, PROMPTS[0])
    for name, folder in adapters.items():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), folder)
        with torch.no_grad():
            ref = peft.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                pad_token_id=engine.tokenizer.pad_token_id)  # fmt: skip
            want = peft(torch.tensor([prompt])).logits
        mixed = engine.generate(
            [GenerationRequest(prompt, other, 8) for other in (None, "alpha", "beta", "gamma")]
        )  # fmt: skip
        row = [None, "alpha", "beta", "gamma"].index(name)
        got = mixed[row]
        # every token, and the same end: PEFT's end-of-sequence is where ours stopped
        want_tokens = ref[0, len(prompt) :].tolist()
        eos = engine.tokenizer.eos_token_id
        if eos in want_tokens:
            want_tokens = want_tokens[: want_tokens.index(eos)]
            assert got.finish_reason == "stop"
        else:
            assert got.finish_reason == "length" and len(want_tokens) == 8
        assert got.token_ids == want_tokens
        # logits alone and as one row of a batch whose other rows use the other slots
        mixed_rows = [GenerationRequest(prompt, a) for a in (None, "alpha", "beta", "gamma")]
        for rows in ([GenerationRequest(prompt, name)], mixed_rows):
            engine._route(rows)
            try:
                with torch.no_grad():
                    logits = engine.model(torch.tensor([prompt] * len(rows))).logits
            finally:
                engine._rows = engine._one_slot = None
            logits = logits[row : row + 1] if len(rows) > 1 else logits
            assert torch.allclose(logits, want, atol=1e-4), (len(rows), (logits - want).abs().max())


def test_a_mixed_batch_equals_each_request_alone_in_shared_forward_passes(engine):
    requests = [
        GenerationRequest(ids(engine, PROMPTS[i % 4]), [None, "alpha", "beta", "gamma"][i % 4],
                          max_new_tokens=4 + i % 5)
        for i in range(16)
    ]  # fmt: skip
    alone = [engine.generate([r])[0] for r in requests]
    before = engine.stats.mixed_forward_passes
    calls = engine.stats.generate_calls
    together = engine.generate(requests)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    assert engine.stats.generate_calls == calls + 1  # one batch: all greedy
    assert engine.stats.mixed_forward_passes > before
    for r, g in zip(requests, together, strict=True):
        assert g.completion_tokens <= r.max_new_tokens
        assert g.finish_reason in ("stop", "length")
        assert g.finish_reason == "stop" or g.completion_tokens == r.max_new_tokens


def test_rows_of_any_sampling_settings_share_one_call_and_seeds_repeat(engine):
    prompt = ids(engine, PROMPTS[1])
    hot = GenerationRequest(prompt, "alpha", 8, temperature=1.5, top_p=0.9, seed=7)
    calls = engine.stats.generate_calls
    first = engine.generate(
        [
            hot,
            GenerationRequest(prompt, "beta", 8),
            GenerationRequest(prompt, "alpha", 8, temperature=1.5, seed=8),
        ]
    )
    assert engine.stats.generate_calls == calls + 1  # greedy, seed 7 and seed 8 together
    [greedy] = engine.generate([GenerationRequest(prompt, "beta", 8)])
    assert first[1].token_ids == greedy.token_ids  # the greedy row is untouched by the others
    again = engine.generate([GenerationRequest(prompt, "alpha", 8, temperature=1.5, top_p=0.9,
                                               seed=7)])  # fmt: skip
    assert again[0].token_ids == first[0].token_ids  # the same seed alone: the same answer
    draws = {
        tuple(
            engine.generate([GenerationRequest(prompt, "alpha", 8, temperature=1.5, seed=s)])[
                0
            ].token_ids
        )
        for s in range(6)
    }
    assert len(draws) > 1  # seeds do sample


def test_top_p_keeps_only_the_nucleus():
    from ftservice.serve.engine import _RowSampler

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(200):
        row = GenerationRequest([1], temperature=1.0, top_p=0.7, seed=seed)
        out = _RowSampler([row])(torch.zeros(1, 1, dtype=torch.long), scores)
        assert torch.isfinite(out[0]).sum() == 1  # one token left for greedy search to take
        seen.add(int(out[0].argmax()))
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7: the two others are never drawn


def test_stop_strings_and_streams_are_per_row(engine):
    prompt = ids(engine, PROMPTS[2])
    [free] = engine.generate([GenerationRequest(prompt, "gamma", 16)])
    assert len(free.text) > 4
    stop = free.text[3:5]
    pieces: list[str] = []
    stopped, other = engine.generate(
        [GenerationRequest(prompt, "gamma", 16, stop=[stop], on_text=pieces.append),
         GenerationRequest(prompt, "gamma", 16)]
    )  # fmt: skip
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.finish_reason == "stop"
    assert "".join(pieces) == stopped.text
    assert other.text == free.text  # the other row did not stop


def test_lru_eviction_deletes_the_adapter_from_the_one_model(tiny_llama, adapters):
    engine = Engine(tiny_llama, max_adapters=2)
    engine.load_adapter("alpha", adapters["alpha"])
    engine.load_adapter("beta", adapters["beta"])
    engine.generate([GenerationRequest(ids(engine, "x"), "alpha", 2)])  # alpha used last
    engine.load_adapter("gamma", adapters["gamma"])
    assert engine.loaded_adapters() == ["alpha", "gamma"]
    # beta's slot now holds gamma: only two slots besides the base's, ever
    slots = next(iter(engine.slots.values()))
    assert slots.A.shape[1] == 2 * slots.rank and sorted(engine.adapters.values()) == [1, 2]
    with pytest.raises(KeyError, match="adapters not loaded: beta"):
        engine.generate([GenerationRequest(ids(engine, "x"), "beta", 2)])
    base_params = sum(p.numel() for p in engine.model.parameters())
    assert engine.unload_adapter("alpha")
    alpha_slot = 1 if engine.adapters["gamma"] == 2 else 2
    assert all(not w.any() for s in engine.slots.values() for w in s.view(alpha_slot))
    assert engine.unload_adapter("gamma")
    assert engine.slots == {}  # back to the plain base: no slots, no hooks
    assert not any(m._forward_hooks for m in engine.model.modules())
    assert sum(p.numel() for p in engine.model.parameters()) == base_params
    [gen] = engine.generate([GenerationRequest(ids(engine, "x"), None, 2)])
    assert gen.completion_tokens >= 1


def test_logprobs_of_generated_and_prompt_tokens(engine, adapters):
    short, long = ids(engine, "Colour:"), ids(engine, "The warranty of every product is")
    [greedy] = engine.generate([GenerationRequest(short, "beta", 5, logprobs=3)])
    for chosen, top in zip(greedy.token_logprobs, greedy.top_logprobs, strict=True):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()), abs=1e-5)
    # prompt scoring, as lm-evaluation-harness asks (echo, no new tokens): a left-padded row
    # scores exactly as it does alone, and as a plain forward pass does
    alone = engine.generate([GenerationRequest(short, "alpha", 0, echo_logprobs=True)])[0]
    padded, _ = engine.generate(
        [GenerationRequest(short, "alpha", 0, echo_logprobs=True),
         GenerationRequest(long, "gamma", 0, echo_logprobs=True)]
    )  # fmt: skip
    assert alone.completion_tokens == 0 and alone.prompt_logprobs[0] is None
    assert padded.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[1:], abs=1e-4)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(engine.base_path), adapters["alpha"]
    )
    with torch.no_grad():
        logits = peft(torch.tensor([short])).logits
    plain = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(short[1:])[:, None])
    assert alone.prompt_logprobs[1:] == pytest.approx(plain[:, 0].tolist(), abs=1e-4)


def test_adapters_of_different_ranks_share_a_batch_and_answer_as_alone(
    tiny_llama, adapters, tmp_path
):
    """The slots grow to the largest rank loaded (a rank-8 adapter after rank-4 ones, then a
    rank-2 one) and every adapter still answers in a mixed batch exactly as it does alone."""
    engine = Engine(tiny_llama, max_adapters=4)
    engine.load_adapter("alpha", adapters["alpha"])
    engine.load_adapter("wide", write_adapter(tmp_path / "wide", tiny_llama, 7, rank=8))
    engine.load_adapter("narrow", write_adapter(tmp_path / "narrow", tiny_llama, 8, rank=2))
    assert {s.rank for s in engine.slots.values()} == {8}
    names = [None, "alpha", "wide", "narrow"]
    alone = {n: engine.generate([GenerationRequest(ids(engine, PROMPTS[1]), n, 8)])[0]
             for n in names}  # fmt: skip
    mixed = engine.generate([GenerationRequest(ids(engine, PROMPTS[1]), n, 8) for n in names])
    assert [g.token_ids for g in mixed] == [alone[n].token_ids for n in names]
    assert len({tuple(alone[n].token_ids) for n in names}) == 4
