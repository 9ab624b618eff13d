"""The two serving backends side by side, in one run, through the whole app (HTTP, our ingress,
Ray Serve): `backend: transformers` (our engine, transformers + PEFT) against `backend: vllm`
(Ray Serve LLM's vLLM engine, in .venv-vllm), on the built-in SmolLM2-135M with 8 written
LoRA adapters (rank 16, every linear layer, random non-zero B).

For each backend, at a fixed concurrency of 8 clients (each sends its next request when the
last returns), 32 new tokens a request, greedy:
  - base only;
  - 1 adapter;
  - 8 adapters under Zipf traffic (S-LoRA's setting, exponent 1).
Reported: completion tokens/s and latency p50/p99 per request, and ratios (vllm /
transformers; 8 adapters / 1 adapter). One model replica of 1 CPU each; the app is removed
before the next is deployed, so they never share the machine.

    make vllm-env && .venv/bin/python benchmarks/serve_backends.py [--requests 48]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from serve_adapters import ADAPTERS, PROMPTS, pct, traffic, write_adapters  # noqa: E402

CONCURRENCY = 8


def publish_all(registry: Path, folders: list[Path], base) -> list[str]:
    from test_serve_gate import publish_adapter
    from transformers import AutoTokenizer

    names = []
    for i, folder in enumerate(folders):
        AutoTokenizer.from_pretrained(base.path).save_pretrained(folder)
        publish_adapter(registry, f"adapter{i}", folder, base)
        names.append(f"adapter{i}")
    return names


def run_load(client, models: list[str], new_tokens: int) -> dict:
    latencies, tokens = [], 0

    def one(i_model):
        i, model = i_model
        t0 = time.perf_counter()
        out = client.chat.completions.create(
            model=model, max_tokens=new_tokens, temperature=0,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        )  # fmt: skip
        return time.perf_counter() - t0, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for latency, n in pool.map(one, enumerate(models)):
            latencies.append(latency)
            tokens += n
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(pct(latencies, 0.99), 3),
        "requests": len(models),
        "completion_tokens": tokens,
    }


def bench_backend(backend: str, spec_base: dict, names: list[str], args) -> dict:
    import openai
    from ray import serve

    from ftservice.serve.app import build_app
    from ftservice.serve.spec import ServeSpec

    spec = ServeSpec.model_validate(spec_base | {"name": backend, "backend": backend})
    t0 = time.perf_counter()
    serve.run(build_app(spec), name=backend, route_prefix=f"/{backend}")
    started = time.perf_counter() - t0
    client = openai.OpenAI(base_url=f"{args.url}/{backend}/v1", api_key=args.key, max_retries=0)
    try:
        hello = [{"role": "user", "content": "hi"}]
        for name in ["smollm2-135m-instruct", *names]:  # warm: every adapter loaded once
            client.chat.completions.create(model=name, max_tokens=1, messages=hello)
        n = args.requests
        out = {"start_s": round(started, 1)}
        out["base"] = run_load(client, ["smollm2-135m-instruct"] * n, args.new_tokens)
        out["one_adapter"] = run_load(client, [names[0]] * n, args.new_tokens)
        zipf = [names[i] for i in traffic(n, ADAPTERS, zipf=True)]
        out["eight_adapters_zipf"] = run_load(client, zipf, args.new_tokens)
        out["eight_over_one"] = round(
            out["eight_adapters_zipf"]["tokens_per_s"] / out["one_adapter"]["tokens_per_s"], 2
        )
        return out
    finally:
        serve.delete(backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--backends", nargs="*", default=["transformers", "vllm"])
    args = parser.parse_args()

    import ray
    from ray import serve

    from ftservice.config import ModelSpec
    from ftservice.models import resolve_model
    from ftservice.store.db import open_store
    from ftservice.store.keys import create_key

    root = Path(tempfile.mkdtemp(prefix="ftservice-backends-"))
    base = resolve_model(ModelSpec(name="smollm2-135m-instruct"))
    names = publish_all(root / "registry", write_adapters(root, base.path), base)
    store = f"sqlite:///{root / 'ftservice.db'}"
    args.key = create_key(open_store(store), "bench", ["inference"])
    spec_base = {
        "model": {"name": "smollm2-135m-instruct"}, "registries": [str(root / "registry")],
        "replicas": {"num": 1, "cpus": 1, "max_adapters": ADAPTERS, "torch_threads": 1},
        "batching": {"max_batch_size": CONCURRENCY, "batch_wait_timeout_s": 0.01},
        "limits": {"max_tokens": 256, "max_queued_requests": 64}, "store": {"url": store},
        "vllm": {"python": str(HERE.parent / ".venv-vllm" / "bin" / "python"),
                 "kv_cache_gib": 1},
    }  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8765})
        args.url = "http://127.0.0.1:8765"
        results = {b: bench_backend(b, spec_base, names, args) for b in args.backends}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if {"transformers", "vllm"} <= set(results):
        results["vllm_over_transformers"] = {
            load: round(results["vllm"][load]["tokens_per_s"]
                        / results["transformers"][load]["tokens_per_s"], 2)
            for load in ("base", "one_adapter", "eight_adapters_zipf")
        }  # fmt: skip
    print(json.dumps({"requests": args.requests, "new_tokens": args.new_tokens,
                      "concurrency": CONCURRENCY, **results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
