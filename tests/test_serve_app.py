"""The serving app on a real local Ray with Serve, spoken to with the official `openai`
client and plain HTTP: three adapters written to answer differently on the tiny model, one
base, mixed-adapter batches, hot-add and removal, the gate, keys and limits."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import free_port, short_dir
from test_serve_engine import write_adapter
from test_serve_gate import publish_adapter
from transformers import AutoTokenizer

from ftservice.config import ModelSpec
from ftservice.models import resolve_model

pytestmark = pytest.mark.slow
ADAPTERS = {"alpha": 1, "beta": 2, "gamma": 3}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_llama, other_tiny_llama):
    """One Serve app for the module: three adapters and a wrong-base one in a registry."""
    import ray
    from ray import serve

    from ftservice.serve.app import build_app
    from ftservice.serve.spec import ServeSpec
    from ftservice.store.db import open_store
    from ftservice.store.keys import create_key

    root = tmp_path_factory.mktemp("serve")
    registry = root / "registry"
    base = resolve_model(ModelSpec(name=str(tiny_llama)))
    for name, seed in ADAPTERS.items():
        folder = write_adapter(root / name, tiny_llama, seed)
        if name != "gamma":  # artifacts carry their tokenizer; one without falls back
            AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
        publish_adapter(registry, name, folder, base)
    other = resolve_model(ModelSpec(name=str(other_tiny_llama)))
    publish_adapter(registry, "wrong-base", write_adapter(root / "wb", other_tiny_llama, 5), other)
    store_url = f"sqlite:///{root / 'state' / 'ftservice.db'}"
    spec = ServeSpec.model_validate(
        {"name": "test", "model": {"name": str(tiny_llama)}, "base_name": "tiny",
         "registries": [str(registry)], "replicas": {"num": 1, "cpus": 0.5, "max_adapters": 8},
         "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.2},
         "generation": {"max_tokens": 16, "temperature": 0.0},
         "limits": {"max_tokens": 64, "max_request_bytes": 4096},
         "store": {"url": store_url}, "cors_origins": ["http://allowed.example"]}
    )  # fmt: skip
    store = open_store(store_url)
    keys = {
        "user": create_key(store, "user", ["inference"]),
        "admin": create_key(store, "admin", ["inference", "admin"]),
        "annotator": create_key(store, "annotator", ["annotator"]),
        "limited": create_key(store, "limited", ["inference"], requests_per_minute=2),
    }
    port = free_port()
    ray_tmp = short_dir("ftr-serve-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_metrics_report_interval_ms", "1000")  # metrics seen within seconds
        mp.delenv("RAY_ADDRESS", raising=False)
        metrics_port = free_port()
        # the dashboard: Ray Train's state queries (a job trained beside the app) need it
        ray.init(num_cpus=2, _temp_dir=str(ray_tmp), dashboard_port=free_port(),
                 _metrics_export_port=metrics_port, logging_level="warning")  # fmt: skip
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(spec), name="test", route_prefix="/")
            yield {"url": f"http://127.0.0.1:{port}", "keys": keys, "registry": registry,
                   "root": root, "base": base, "tiny": tiny_llama, "ray_tmp": ray_tmp,
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}  # fmt: skip
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def client(app, key: str = "user") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app['url']}/v1", api_key=app["keys"][key], max_retries=0)


def http(
    app, method: str, path: str, body=None, key: str | None = "user", raw: bytes | None = None
):
    """Status, headers and JSON body of a plain HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"{app['url']}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {app['keys'].get(key, key)}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, _json(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, _json(e.read())


def _json(raw: bytes):
    """The JSON body, or what came instead (so a failing assertion shows it)."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"not_json": raw.decode(errors="replace")}


def chat(app, model: str, text: str = "Tell me about the warranty.", **kw) -> str:
    out = client(app).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        temperature=0,
        max_tokens=12,
        **kw,
    )
    return out.choices[0].message.content


def test_models_lists_the_base_and_every_adapter_with_the_gate(app):
    models = {m.id: m for m in client(app).models.list().data}
    assert set(models) == {"tiny", "alpha", "beta", "gamma", "wrong-base"}
    assert models["alpha"].model_extra["parent"] == "tiny"
    assert models["alpha"].model_extra["gate"]["servable"] is True
    gate = models["wrong-base"].model_extra["gate"]
    assert gate["servable"] is False and "fingerprint" in gate["reason"]


def test_each_adapter_and_the_base_answer_differently(app):
    answers = {m: chat(app, m) for m in ("tiny", "alpha", "beta", "gamma")}
    assert len(set(answers.values())) == 4, answers
    assert chat(app, "tiny:beta") == answers["beta"]  # Ray Serve LLM's spelling


def test_streaming_chat_with_usage_equals_the_whole_answer(app):
    whole = chat(app, "gamma")
    stream = client(app).chat.completions.create(
        model="gamma",
        messages=[{"role": "user", "content": "Tell me about the warranty."}],
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completions_with_logprobs_and_echo(app):
    out = client(app).completions.create(
        model="alpha",
        prompt="The warranty lasts",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        echo=True,
    )
    choice = out.choices[0]
    assert choice.text.startswith("The warranty lasts")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has no context
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert out.usage.completion_tokens == len(lp.tokens) - out.usage.prompt_tokens


def test_concurrent_requests_over_three_adapters_and_the_base_share_forward_passes(app):
    models = ["tiny", "alpha", "beta", "gamma"] * 4
    alone = {m: chat(app, m, "Where is the headquarters?") for m in set(models)}
    before = http(app, "GET", "/v1/stats", key="admin")[2]["mixed_forward_passes"]
    aclient = openai.AsyncOpenAI(base_url=f"{app['url']}/v1", api_key=app["keys"]["user"],
                                 max_retries=0)  # fmt: skip

    async def one(m):
        out = await aclient.chat.completions.create(
            model=m,
            messages=[{"role": "user", "content": "Where is the headquarters?"}],
            temperature=0,
            max_tokens=12,
        )
        return out.choices[0].message.content

    async def everyone():
        return await asyncio.gather(*(one(m) for m in models))

    together = asyncio.run(everyone())
    assert together == [alone[m] for m in models]
    stats = http(app, "GET", "/v1/stats", key="admin")[2]
    after = stats["mixed_forward_passes"]
    assert after > before, {
        k: stats[k] for k in ("largest_batch", "generate_calls", "mixed_forward_passes")
    }  # at least one forward pass mixed two or more adapters


def test_an_adapter_published_while_serving_is_servable_and_can_be_unloaded(app):
    from ftservice.artifacts import remove

    name = "delta"
    assert name not in {m.id for m in client(app).models.list().data}
    publish_adapter(app["registry"], name, write_adapter(app["root"] / name, app["tiny"], 9),
                    app["base"])  # fmt: skip
    assert name in {m.id for m in client(app).models.list().data}
    assert chat(app, name)
    status, _, body = http(app, "POST", "/v1/unload_lora_adapter", {"lora_name": name}, "admin")
    assert status == 200 and body["status"] == "unloaded"
    with pytest.raises(openai.NotFoundError) as err:
        chat(app, name)
    assert err.value.code == "model_not_found"
    status, _, _ = http(app, "POST", "/v1/load_lora_adapter", {"lora_name": name}, "admin")
    assert status == 200 and chat(app, name)
    remove(name, app["registry"])
    assert name not in {m.id for m in client(app).models.list().data}


def test_a_train_job_runs_beside_the_app_and_its_adapter_is_served_without_a_restart(app):
    """The app's replicas hold fractional CPUs, so Ray Train can still schedule a worker on
    this 2-CPU Ray; the artifact it publishes into the served registry is servable at once."""
    from conftest import REPO

    from ftservice.config import spec_from_dict
    from ftservice.train.driver import train

    data = app["root"] / "train.jsonl"
    data.write_text("\n".join((REPO / "data/domain/train.jsonl").read_text().splitlines()[:16]))
    spec = spec_from_dict(
        {"name": "beside", "model": {"name": str(app["tiny"])},
         "data": {"train": [str(data)], "max_seq_length": 96}, "lora": {"r": 4, "alpha": 8},
         "train": {"learning_rate": 5e-3, "micro_batch_size": 8, "max_steps": 4,
                   "warmup_ratio": 0},
         "scaling": {"num_workers": 1, "cpus_per_worker": 1},
         "checkpoint": {"every_steps": 4, "num_to_keep": 1},
         "eval": {"domain": None, "general": None},
         "output": {"registry": str(app["registry"]),
                    "storage_path": str(app["root"] / "runs")}}
    )  # fmt: skip
    assert chat(app, "alpha")  # the app is serving while the job runs
    result = train(spec, evaluate=False)
    assert result.artifact.meta.metrics["global_step"] == 4
    assert "beside" in {m.id for m in client(app).models.list().data}
    assert chat(app, "beside")


def test_errors_have_openai_shapes_and_status_codes(app):
    def error(status_body):
        status, headers, body = status_body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return status, body["error"], headers

    status, e, _ = error(http(app, "GET", "/v1/models", key=None))
    assert status == 401 and e["code"] == "invalid_api_key"
    status, e, _ = error(http(app, "GET", "/v1/models", key="fts-not-a-key"))
    assert status == 401 and e["code"] == "invalid_api_key"
    status, e, _ = error(http(app, "GET", "/v1/models", key="annotator"))
    assert status == 403 and "lacks the 'inference' scope" in e["message"]
    status, e, _ = error(http(app, "POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"}))
    assert status == 403
    msg = [{"role": "user", "content": "hi"}]
    status, e, _ = error(
        http(app, "POST", "/v1/chat/completions", {"model": "nope", "messages": msg})
    )
    assert status == 404 and e["code"] == "model_not_found" and e["param"] == "model"
    status, e, _ = error(http(app, "POST", "/v1/chat/completions",
                              {"model": "../alpha", "messages": msg}))  # fmt: skip
    assert status == 400 and "is not an adapter name" in e["message"]
    status, e, _ = error(http(app, "POST", "/v1/chat/completions",
                              {"model": "wrong-base", "messages": msg}))  # fmt: skip
    assert status == 400 and e["code"] == "adapter_not_servable"
    status, e, _ = error(http(app, "POST", "/v1/chat/completions",
                              {"model": "alpha", "messages": msg, "max_tokens": 65}))  # fmt: skip
    assert status == 400 and e["param"] == "max_tokens"
    status, e, _ = error(http(app, "POST", "/v1/chat/completions",
                              {"model": "alpha", "messages": msg, "temperature": 7}))  # fmt: skip
    assert status == 400 and e["param"] == "temperature"
    long = [{"role": "user", "content": "word " * 1000}]  # over the 4096-byte body cap
    status, e, _ = error(http(app, "POST", "/v1/completions",
                              {"model": "alpha", "prompt": "word " * 700,
                               "max_tokens": 8}))  # fmt: skip
    assert status == 400 and e["code"] == "context_length_exceeded"
    status, e, _ = error(http(app, "POST", "/v1/chat/completions",
                              {"model": "alpha", "messages": long}))  # fmt: skip
    assert status == 413 and e["code"] == "request_too_large"


def cors_headers(app, path: str, origin: str, preflight: bool = False) -> dict:
    req = urllib.request.Request(f"{app['url']}{path}", method="OPTIONS" if preflight else "GET")
    req.add_header("Origin", origin)
    if preflight:
        req.add_header("Access-Control-Request-Method", "POST")
        req.add_header("Access-Control-Request-Headers", "authorization,content-type")
    else:
        req.add_header("Authorization", f"Bearer {app['keys']['user']}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return {k.lower(): v for k, v in r.headers.items()} | {"status": r.status}
    except urllib.error.HTTPError as e:
        return {k.lower(): v for k, v in e.headers.items()} | {"status": e.code}


def test_cors_only_for_the_origins_the_spec_lists(app):
    allowed = cors_headers(app, "/v1/models", "http://allowed.example")
    assert allowed["status"] == 200
    assert allowed["access-control-allow-origin"] == "http://allowed.example"
    preflight = cors_headers(app, "/v1/chat/completions", "http://allowed.example", True)
    assert preflight["status"] == 200 and "POST" in preflight["access-control-allow-methods"]
    other = cors_headers(app, "/v1/models", "http://elsewhere.example")
    assert other["status"] == 200 and "access-control-allow-origin" not in other
    refused = cors_headers(app, "/v1/chat/completions", "http://elsewhere.example", True)
    assert refused["status"] == 400 and "access-control-allow-origin" not in refused


def test_the_rate_limit_answers_429_with_retry_after(app):
    seen = []
    for _ in range(4):
        status, headers, body = http(app, "GET", "/v1/models", key="limited")
        seen.append(status)
        if status == 429:
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(headers["retry-after"]) <= 60
    assert 200 in seen and 429 in seen


def test_usage_is_counted_per_key(app):
    from ftservice.store.db import open_store
    from ftservice.store.keys import list_keys

    store = open_store(f"sqlite:///{app['root'] / 'state' / 'ftservice.db'}")
    before = {k["name"]: k for k in list_keys(store)}
    chat(app, "alpha")
    after = {k["name"]: k for k in list_keys(store)}
    assert after["user"]["requests"] == before["user"]["requests"] + 1
    assert after["user"]["completion_tokens"] > before["user"]["completion_tokens"]


def _processes_with(entry: str) -> list[int]:
    from pathlib import Path

    needle = entry.encode() + b"\0"
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def test_serve_run_prints_how_to_call_it_and_sigterm_leaves_no_process(
    tmp_path, cli_env, short_tmp, tiny_llama
):
    import os
    import signal
    import subprocess
    import sys

    registry = tmp_path / "registry"
    base = resolve_model(ModelSpec(name=str(tiny_llama)))
    publish_adapter(registry, "solo", write_adapter(tmp_path / "solo", tiny_llama, 4), base)
    spec = tmp_path / "serve.yaml"
    spec.write_text(json.dumps({
        "name": "cli", "model": {"name": str(tiny_llama)}, "base_name": "tiny",
        "registries": [str(registry)], "generation": {"max_tokens": 4},
        "store": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
    }))  # fmt: skip
    port = free_port()
    env = cli_env | {"FTSERVICE_API_KEYS": "test-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftservice", "serve", "run", str(spec), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        out = "".join(lines)
        assert f"serving cli at http://127.0.0.1:{port}/v1" in out, out[-3000:]
        assert "adapter solo: servable" in out
        assert '"Authorization: Bearer $FTSERVICE_API_KEY"' in out and "test-key" not in out
        app = {"url": f"http://127.0.0.1:{port}", "keys": {"k": "test-key"}}
        hello = {"model": "solo", "messages": [{"role": "user", "content": "hi"}]}
        status, _, body = http(app, "POST", "/v1/chat/completions", hello, key="k")
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p for p in _processes_with(f"RAY_TMPDIR={short_tmp}") if p != os.getpid()]
    for _ in range(20):  # Ray's own processes take a moment to go
        if not left:
            break
        import time

        time.sleep(0.5)
        left = [p for p in _processes_with(f"RAY_TMPDIR={short_tmp}") if p != os.getpid()]
    assert left == []


def test_a_replica_killed_under_requests_fails_none_of_them(app, tiny_llama):
    """Two model replicas; one is killed while it runs requests (its own count says so): no
    non-streaming request fails (the ingress sends again what a dead replica dropped)."""
    import ray
    from ray import serve

    from ftservice.serve.app import build_app
    from ftservice.serve.spec import ServeSpec

    spec = ServeSpec.model_validate(
        {"name": "two", "model": {"name": str(tiny_llama)}, "base_name": "tiny",
         "registries": [str(app["registry"])], "replicas": {"num": 2, "cpus": 0.4},
         "generation": {"max_tokens": 64, "temperature": 0.0},
         "store": {"url": f"sqlite:///{app['root'] / 'state' / 'ftservice.db'}"}}
    )  # fmt: skip
    serve.run(build_app(spec), name="two", route_prefix="/two")
    try:
        two = openai.OpenAI(base_url=f"{app['url']}/two/v1", api_key=app["keys"]["user"],
                            max_retries=0)  # fmt: skip
        hello = [{"role": "user", "content": "warm up"}]
        two.chat.completions.create(model="alpha", messages=hello, max_tokens=2)
        model = serve.get_deployment_handle("model", app_name="two")
        aclient = None

        async def one(i):
            out = await aclient.chat.completions.create(
                model=["alpha", "beta", "tiny"][i % 3],
                messages=[{"role": "user", "content": f"Question {i}?"}],
                max_tokens=64,
            )
            return out.choices[0].finish_reason

        async def storm():
            nonlocal aclient
            aclient = openai.AsyncOpenAI(base_url=f"{app['url']}/two/v1",
                                         api_key=app["keys"]["user"], max_retries=0)  # fmt: skip
            tasks = [asyncio.ensure_future(one(i)) for i in range(24)]
            # the victim is a replica seen running requests (asked until one says so)
            for _ in range(200):
                stats = await model.stats.remote()
                if stats["in_flight"] > 0:
                    break
                await asyncio.sleep(0.02)
            assert stats["in_flight"] > 0, "no replica was seen running requests"
            [victim] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                        if stats["replica"] in a["name"]]  # fmt: skip
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(storm())
        failed = [r for r in results if isinstance(r, Exception)]
        assert failed == [], failed
        assert all(r in ("stop", "length") for r in results)
    finally:
        serve.delete("two")


def test_a_full_queue_answers_503_and_a_late_request_408_and_the_app_lives_on(app, tiny_llama):
    """Batches of one, a queue of 1 and a 0.5 s deadline: a storm of
    long requests gets 503 with Retry-After for what cannot queue and 408 for what waited too
    long, each in OpenAI's error shape; nothing else fails and the app answers afterwards."""
    import time

    from ray import serve

    from ftservice.serve.app import build_app
    from ftservice.serve.spec import ServeSpec

    spec = ServeSpec.model_validate(
        {"name": "tight", "model": {"name": str(tiny_llama)}, "base_name": "tiny",
         "registries": [str(app["registry"])], "replicas": {"num": 1, "cpus": 0.3},
         "batching": {"max_batch_size": 1}, "generation": {"temperature": 0.0},
         "limits": {"max_queued_requests": 1, "request_timeout_s": 0.5, "max_tokens": 256},
         "store": {"url": f"sqlite:///{app['root'] / 'state' / 'ftservice.db'}"}}
    )  # fmt: skip
    serve.run(build_app(spec), name="tight", route_prefix="/tight")
    try:
        long = {"model": "tiny", "max_tokens": 256,
                "messages": [{"role": "user", "content": "Say a lot."}]}  # fmt: skip

        def answered(max_tokens: int) -> dict:
            """A short request once the replica is idle (a fresh replica's first requests
            may take longer than the deadline: those are 408s too)."""
            for _ in range(10):
                while model.stats.remote().result()["in_flight"]:
                    time.sleep(0.1)
                status, _, body = http(app, "POST", "/tight/v1/chat/completions",
                                       long | {"max_tokens": max_tokens})  # fmt: skip
                if status == 200:
                    return body
                assert status == 408, body
            raise AssertionError("no answer within the deadline in 10 tries")

        model = serve.get_deployment_handle("model", app_name="tight")
        answered(1)
        # this spec lists no origins: no CORS at all
        assert "access-control-allow-origin" not in cors_headers(
            app, "/tight/v1/models", "http://allowed.example"
        )

        with ThreadPoolExecutor(24) as pool:  # all 24 at once
            results = list(pool.map(
                lambda _: http(app, "POST", "/tight/v1/chat/completions", long), range(24)
            ))  # fmt: skip
        by_status: dict[int, list] = {}
        for status, headers, body in results:
            by_status.setdefault(status, []).append((headers, body))
        assert set(by_status) <= {200, 408, 503}, {s: b[0][1] for s, b in by_status.items()}
        assert 503 in by_status and 408 in by_status, sorted(by_status)
        for headers, body in by_status[503]:
            assert body["error"]["type"] == "server_error" and headers["retry-after"] == "1"
        for _, body in by_status[408]:
            assert (
                body["error"]["code"] == "request_timeout" and "0.5 s" in body["error"]["message"]
            )
        assert answered(2)["usage"]["completion_tokens"] == 2
    finally:
        serve.delete("tight")


def test_per_adapter_metrics_reach_prometheus_and_every_request_has_an_access_line(app):
    """Ray's metrics agent exports our counters per model (Prometheus text); the access log
    has one line per request, refused ones included, with its id, key and model, never the
    prompt (log_prompts is off)."""
    import re
    import time

    secret = "the secret prompt 4711"
    ids = []
    for model in ("alpha", "alpha", "beta", "nope"):
        body = {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": secret}]}
        status, headers, _ = http(app, "POST", "/v1/chat/completions", body)
        assert status == (404 if model == "nope" else 200)
        ids.append(headers["x-request-id"])

    def sample(text, name, **tags):
        """The value of one Prometheus sample whose labels include `tags` (0 if absent)."""
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in tags.items()):
                total += float(m.group(2))
        return total

    route = "/v1/chat/completions"
    for _ in range(60):  # Ray's agent exports what the replicas report every second
        text = urllib.request.urlopen(app["metrics"], timeout=10).read().decode()
        if sample(text, "ray_ftservice_requests_total", model="beta", route=route, status="200"):
            break
        time.sleep(1)
    assert sample(text, "ray_ftservice_requests_total", model="alpha", status="200") >= 2
    assert sample(text, "ray_ftservice_requests_total", model="beta", status="200") >= 1
    assert sample(text, "ray_ftservice_requests_total", model="-", status="404") >= 1
    assert sample(text, "ray_ftservice_tokens_total", model="alpha", kind="completion") >= 6
    assert sample(text, "ray_ftservice_request_latency_ms_count", model="beta", route=route) >= 1
    assert 'application="test"' in text  # Serve's own tags are on our metrics too

    from pathlib import Path

    import ray

    logs_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    logs = "".join(p.read_text(errors="replace") for p in logs_dir.glob("serve/*ingress*.log"))
    for rid, model in zip(ids, ("alpha", "alpha", "beta", "-"), strict=True):
        [line] = [line for line in logs.splitlines() if f"request {rid} " in line]
        assert f"key=user route={route} model={model} " in line, line
        assert re.search(r" id=(chatcmpl-[0-9a-f]{24}|-)$", line), line
        assert ("status=404" if model == "-" else "status=200") in line
    assert secret not in logs
