"""The serving app on a real local Ray with Serve, spoken to with the official `openai`
client and plain HTTP: three adapters written to answer differently on the tiny model, one
base, mixed-adapter batches, hot-add and removal, the gate, keys and limits."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import free_port, short_dir
from test_serve_engine import write_adapter
from test_serve_gate import publish_adapter
from transformers import AutoTokenizer

from ftservice.config import ModelSpec
from ftservice.models import resolve_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
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
         "store": {"url": store_url}, "cors_origins": ["http://allowed.example"],
         "jobs": {"storage": str(root / "jobs"), "max_file_bytes": 8192,
                  "max_project_bytes": 12000, "max_concurrent_jobs": 1,
                  "defaults": {"scaling.num_workers": 0, "data.max_seq_length": 96,
                               "checkpoint.every_steps": 2}}}
    )  # fmt: skip
    store = open_store(store_url)
    keys = {
        "user": create_key(store, "user", ["inference"]),
        "admin": create_key(store, "admin", ["inference", "admin"]),
        "annotator": create_key(store, "annotator", ["annotator"]),
        "limited": create_key(store, "limited", ["inference"], requests_per_minute=2),
        "acme": create_key(store, "acme", ["inference", "jobs"], project="acme"),
        "rival": create_key(store, "rival", ["jobs"], project="rival"),
    }
    port = free_port()
    ray_tmp = short_dir("ftr-serve-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_metrics_report_interval_ms", "1000")  # metrics seen within seconds
        mp.delenv("RAY_ADDRESS", raising=False)
        # no venv on PATH: a fine-tuning job must find ftservice's python without it
        venv_bin = str(Path(sys.executable).parent)
        mp.setenv("PATH", ":".join(p for p in os.environ["PATH"].split(":") if p != venv_bin))
        metrics_port = free_port()
        # the dashboard: Ray Train's state queries (a job trained beside the app) need it
        dashboard_port = free_port()
        ray.init(num_cpus=2, _temp_dir=str(ray_tmp), dashboard_port=dashboard_port,
                 _metrics_export_port=metrics_port, logging_level="warning")  # fmt: skip
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(spec), name="test", route_prefix="/")
            yield {"url": f"http://127.0.0.1:{port}", "keys": keys, "registry": registry,
                   "root": root, "base": base, "tiny": tiny_llama, "ray_tmp": ray_tmp,
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                   "dashboard": f"http://127.0.0.1:{dashboard_port}"}  # fmt: skip
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


def training_lines(n: int) -> bytes:
    lines = (REPO / "data/domain/train.jsonl").read_text().splitlines()[:n]
    return ("\n".join(lines) + "\n").encode()


def test_files_are_uploaded_checked_listed_read_and_deleted_per_project(app):
    acme, rival = client(app, "acme"), client(app, "rival")
    data = training_lines(16)
    made = acme.files.create(file=("domain.jsonl", data), purpose="fine-tune")
    assert made.id.startswith("file-") and made.bytes == len(data)
    assert made.filename == "domain.jsonl" and made.purpose == "fine-tune"
    assert made.model_extra["ftservice"] == {"format": "alpaca", "records": 16, "kinds": "chat 16"}
    assert acme.files.retrieve(made.id).bytes == len(data)
    assert acme.files.content(made.id).read() == data
    assert made.id in [f.id for f in acme.files.list()]
    # another project sees none of it: its ids answer 404, as unknown ids do
    assert made.id not in [f.id for f in rival.files.list()]
    for call in (rival.files.retrieve, rival.files.content, rival.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(made.id)
    # a key without the jobs scope may not upload
    with pytest.raises(openai.PermissionDeniedError):
        client(app, "user").files.create(file=("d.jsonl", data), purpose="fine-tune")
    stored = app["root"] / "jobs" / "files" / "acme" / made.id / "domain.jsonl"
    assert stored.read_bytes() == data
    assert acme.files.delete(made.id).deleted is True
    assert not stored.parent.exists()
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(made.id)


def test_a_bad_file_is_refused_at_upload_with_its_line_and_nothing_is_kept(app):
    acme = client(app, "acme")
    before = [f.id for f in acme.files.list()]
    bad = training_lines(2) + b"{'instruction': 'single quotes'}\n"
    with pytest.raises(openai.BadRequestError) as e:
        acme.files.create(file=("mine.jsonl", bad), purpose="fine-tune")
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == "file"
    assert error["message"].startswith("mine.jsonl:3: "), error  # the upload's name and line
    assert "JSON" in error["message"] and "one JSON object" in error["message"], error
    with pytest.raises(openai.BadRequestError) as e:  # a record of no format we read
        acme.files.create(file=("odd.jsonl", b'{"question": "?"}\n'), purpose="fine-tune")
    assert e.value.body["message"].startswith("odd.jsonl:1: "), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        acme.files.create(file=("d.jsonl", training_lines(2)), purpose="assistants")
    assert e.value.body["param"] == "purpose" and "fine-tune" in e.value.body["message"]
    assert [f.id for f in acme.files.list()] == before
    assert not list((app["root"] / "jobs" / "files").glob("acme/*/mine.jsonl"))


def test_file_size_and_project_space_are_capped(app):
    acme = client(app, "acme")
    with pytest.raises(openai.APIStatusError) as e:  # over max_file_bytes (8192)
        acme.files.create(file=("big.jsonl", training_lines(100)), purpose="fine-tune")
    assert e.value.status_code == 413 and "jobs.max_file_bytes" in e.value.body["message"]
    kept = [acme.files.create(file=(f"p{i}.jsonl", training_lines(30)), purpose="fine-tune")
            for i in range(2)]  # fmt: skip
    assert sum(f.bytes for f in kept) + kept[0].bytes > 12000  # a third is over the project's
    with pytest.raises(openai.APIStatusError) as e:
        acme.files.create(file=("p2.jsonl", training_lines(30)), purpose="fine-tune")
    assert e.value.status_code == 413 and "jobs.max_project_bytes" in e.value.body["message"]
    for f in kept:  # and deleting frees the space
        acme.files.delete(f.id)
    acme.files.delete(
        acme.files.create(file=("p2.jsonl", training_lines(30)), purpose="fine-tune").id
    )


def wait_for(acme, job_id: str, statuses: tuple[str, ...], timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while True:
        job = acme.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        time.sleep(1)


def test_a_supervised_job_trains_publishes_and_its_model_answers_through_the_same_client(app):
    from ftservice.artifacts import load_artifact

    acme = client(app, "acme")
    training = acme.files.create(file=("train.jsonl", training_lines(16)), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model="tiny", training_file=training.id, suffix="Support Bot!",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "batch_size": 4, "learning_rate_multiplier": 10}}},
        # Ray Train workers (local mode keeps no checkpoints): one, beside the app
        extra_body={"ftservice": {"train.max_steps": 4, "lora.r": 4, "scaling.num_workers": 1,
                                  "scaling.cpus_per_worker": 1}},
    )  # fmt: skip
    assert job.id.startswith("ftjob-") and job.status in ("queued", "running"), job.error
    assert job.method.supervised.hyperparameters.batch_size == 4
    done = wait_for(acme, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft-support-bot-")
    artifact = load_artifact(done.fine_tuned_model, app["registry"])
    spec = artifact.meta.spec
    assert spec["train"]["learning_rate"] == pytest.approx(2e-4 * 10)
    assert spec["train"]["micro_batch_size"] * spec["train"]["gradient_accumulation_steps"] == 4
    history = json.loads((artifact.path / "log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    assert done.trained_tokens and done.trained_tokens > 0
    # events: each logged loss as the run logged it, and the status changes
    events = list(acme.fine_tuning.jobs.list_events(job.id, limit=100))
    losses = {e.data["step"]: e.data["loss"] for e in events
              if e.type == "metrics" and e.data and "loss" in e.data}  # fmt: skip
    assert losses == {h["step"]: pytest.approx(h["loss"]) for h in logged}
    assert any(e.message == "status: succeeded" for e in events)
    checkpoints = list(acme.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [4, 2]
    # each a servable model: the last is the job's, the one before was published beside it
    names = [c.fine_tuned_model_checkpoint for c in checkpoints]
    assert names == [done.fine_tuned_model, f"{done.fine_tuned_model}-step-2"]
    assert all(c.model_extra["ftservice"]["servable"] for c in checkpoints)
    assert chat(app, names[1], "Hi")
    earlier = load_artifact(names[1], app["registry"])
    assert earlier.meta.metrics == {"global_step": 2, "checkpoint_of": done.fine_tuned_model}
    assert checkpoints[1].metrics.train_loss == pytest.approx(logged[1]["loss"])
    # the fine-tuned model answers at once, through the same client
    answer = acme.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4, temperature=0,
    )  # fmt: skip
    assert answer.model == done.fine_tuned_model and answer.usage.completion_tokens > 0
    # a DPO job whose parent is that model: a new adapter trained from it
    pairs = (REPO / "data/preference/seeds.jsonl").read_text().splitlines(keepends=True)[:8]
    prefs = acme.files.create(file=("pairs.jsonl", "".join(pairs).encode()), purpose="fine-tune")
    dpo = acme.fine_tuning.jobs.create(
        model=done.fine_tuned_model, training_file=prefs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        extra_body={"ftservice": {"train.max_steps": 2}},
    )  # fmt: skip
    dpo_done = wait_for(acme, dpo.id, ("succeeded", "failed", "cancelled"))
    assert dpo_done.status == "succeeded", dpo_done.error
    assert dpo_done.method.dpo.hyperparameters.beta == 0.2
    child = load_artifact(dpo_done.fine_tuned_model, app["registry"])
    assert child.meta.parent == done.fine_tuned_model and child.meta.spec["stage"] == "dpo"
    assert chat(app, dpo_done.fine_tuned_model, "Hi")  # servable at once too
    # another project sees nothing of it
    rival = client(app, "rival")
    assert job.id not in [j.id for j in rival.fine_tuning.jobs.list()]
    with pytest.raises(openai.NotFoundError):
        rival.fine_tuning.jobs.retrieve(job.id)
    newest = acme.fine_tuning.jobs.list(limit=1)  # cursor pages, newest first
    assert [j.id for j in newest.data] == [dpo.id] and newest.has_more
    assert [j.id for j in acme.fine_tuning.jobs.list(limit=1, after=dpo.id).data] == [job.id]


def test_a_long_job_is_cancelled_its_ray_job_stopped_and_nothing_published(app):
    from ray.job_submission import JobStatus, JobSubmissionClient

    acme = client(app, "acme")
    training = acme.files.create(file=("long.jsonl", training_lines(16)), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model="tiny", training_file=training.id, extra_body={"ftservice": {"train.max_steps": 5000}}
    )
    # one job at a time for this project (jobs.max_concurrent_jobs: 1)
    with pytest.raises(openai.RateLimitError) as e:
        acme.fine_tuning.jobs.create(model="tiny", training_file=training.id)
    assert e.value.body["code"] == "too_many_jobs"
    deadline = time.monotonic() + 300
    while not any(ev.type == "metrics" for ev in acme.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline, "the job never logged a step"
        time.sleep(1)
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "running"
    with pytest.raises(openai.ConflictError) as e:  # its run reads the file
        acme.files.delete(training.id)
    assert e.value.body["code"] == "file_in_use" and job.id in e.value.body["message"]
    cancelled = acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    submission = cancelled.model_extra["ftservice"]["submission"]
    assert JobSubmissionClient(app["dashboard"]).get_job_status(submission) == JobStatus.STOPPED
    name = json.loads((app["root"] / "jobs" / "specs" / "acme" / f"{job.id}.json").read_text())[
        "name"
    ]
    assert not (app["registry"] / name).exists()  # nothing published
    with pytest.raises(openai.ConflictError):  # a job that ended cannot be cancelled again
        acme.fine_tuning.jobs.cancel(job.id)
    assert acme.files.delete(training.id).deleted  # and its file may go now


def test_job_requests_that_cannot_run_are_refused_with_the_field(app):
    acme = client(app, "acme")
    training = acme.files.create(file=("t.jsonl", training_lines(8)), purpose="fine-tune")

    def refused(**kw) -> dict:
        with pytest.raises(openai.APIStatusError) as e:
            acme.fine_tuning.jobs.create(**{"model": "tiny", "training_file": training.id} | kw)
        return {"status": e.value.status_code, **e.value.body}

    missing = refused(training_file="file-000000000000000000000000")
    assert missing["status"] == 400 and missing["param"] == "training_file"
    other = client(app, "rival").files.create(file=("r.jsonl", training_lines(4)),
                                              purpose="fine-tune")  # fmt: skip
    assert refused(training_file=other.id)["param"] == "training_file"  # another project's
    where = refused(extra_body={"ftservice": {"output.registry": "/tmp/elsewhere"}})
    assert where["status"] == 400 and where["param"] == "ftservice.output.registry"
    bad = refused(extra_body={"ftservice": {"lora.r": 0}})
    assert bad["status"] == 400 and bad["param"] == "lora.r" and "lora.r" in bad["message"]
    huge = refused(extra_body={"ftservice": {"train.micro_batch_size": 100000}})
    assert huge["status"] == 400 and huge["code"] == "does_not_fit", huge
    assert "GiB per device" in huge["message"] and "micro_batch_size" in huge["message"]
    pairs = (REPO / "data/preference/seeds.jsonl").read_text().splitlines(keepends=True)[:4]
    prefs = acme.files.create(file=("p.jsonl", "".join(pairs).encode()), purpose="fine-tune")
    wrong = refused(training_file=prefs.id)  # preference pairs for a supervised job
    assert wrong["status"] == 400 and wrong["param"] == "training_file", wrong
    assert refused(model="no-such-model", method={"type": "dpo"},
                   training_file=prefs.id)["status"] == 404  # fmt: skip
    assert [j for j in acme.fine_tuning.jobs.list() if j.training_file in
            (training.id, prefs.id)] == []  # nothing was created  # fmt: skip
    for f in (training, prefs):
        acme.files.delete(f.id)
    client(app, "rival").files.delete(other.id)


def test_a_paused_job_keeps_its_checkpoints_and_resumes_from_the_last(app):
    from ftservice.artifacts import load_artifact

    acme = client(app, "acme")
    training = acme.files.create(file=("pause.jsonl", training_lines(16)), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model="tiny", training_file=training.id,
        extra_body={"ftservice": {"train.max_steps": 60, "scaling.num_workers": 1,
                                  "scaling.cpus_per_worker": 1}},
    )  # fmt: skip
    deadline = time.monotonic() + 300
    run = Path(acme.fine_tuning.jobs.retrieve(job.id).model_extra["ftservice"]["run"])
    # a checkpoint is listed once Ray Train holds it (its snapshot names it): the one a
    # paused job resumes from
    while not list(acme.fine_tuning.jobs.checkpoints.list(job.id)):
        assert time.monotonic() < deadline, (
            "no checkpoint was kept", sorted(p.name for p in run.glob("*")),
            (run / "checkpoint_manager_snapshot.json").read_text()[:2000]
            if (run / "checkpoint_manager_snapshot.json").is_file() else None,
        )  # fmt: skip
        time.sleep(1)
    paused = acme.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused", paused
    kept = [c.step_number for c in acme.fine_tuning.jobs.checkpoints.list(job.id)]
    assert kept and max(kept) < 60
    resumed = acme.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running")
    assert resumed.model_extra["ftservice"]["attempts"] == 2
    done = wait_for(acme, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    metrics = load_artifact(done.fine_tuned_model, app["registry"]).meta.metrics
    assert metrics["resumed"] is True and metrics["global_step"] == 60
    messages = [e.message for e in acme.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert "status: paused" in messages and any(m.startswith("resumed") for m in messages)
    acme.files.delete(training.id)
