"""`ftservice serve deploy / status / shutdown` against a real local Ray head with token auth
on, through Ray's Serve REST API; the deployed app answers the official `openai` client."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import free_port
from test_jobs import cli
from test_serve_engine import write_adapter
from test_serve_gate import publish_adapter

from ftservice.config import ModelSpec
from ftservice.models import resolve_model

pytestmark = pytest.mark.slow


def test_deploy_upgrade_status_and_shutdown_on_a_cluster(ray_head, tmp_path, tiny_llama):
    from ftservice.store.db import open_store
    from ftservice.store.keys import create_key

    registry = tmp_path / "registry"
    base = resolve_model(ModelSpec(name=str(tiny_llama)))
    publish_adapter(registry, "solo", write_adapter(tmp_path / "solo", tiny_llama, 4), base)
    store_url = f"sqlite:///{tmp_path / 'state.db'}"
    key = create_key(open_store(store_url), "deployer", ["inference"])
    port = free_port()
    spec = tmp_path / "serve.yaml"
    spec.write_text(json.dumps({
        "name": "remote", "model": {"name": str(tiny_llama)}, "base_name": "tiny",
        "registries": [str(registry)], "replicas": {"cpus": 0.3, "ingress_cpus": 0.1},
        "generation": {"max_tokens": 8, "temperature": 0.0},
        "store": {"url": store_url}, "port": port,
    }))  # fmt: skip
    addr = ["--address", ray_head.address]

    refused = cli(ray_head, "serve", "deploy", str(spec), *addr, token=None)
    assert refused.returncode == 1
    assert "requires a token (401)" in refused.stderr, refused.stderr

    deployed = cli(ray_head, "serve", "deploy", str(spec), *addr, "--wait", "300")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert deployed.stdout.splitlines()[-1] == "remote: RUNNING", deployed.stdout

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    assert {m.id for m in client.models.list().data} == {"tiny", "solo"}
    hello = [{"role": "user", "content": "Tell me about the warranty."}]
    first = client.chat.completions.create(model="solo", messages=hello)
    assert first.usage.completion_tokens == 8  # the spec's default max_tokens, no EOS

    # a redeploy of the same name is an in-place upgrade: the new default takes effect
    upgraded = cli(ray_head, "serve", "deploy", str(spec), "generation.max_tokens=3", *addr,
                   "--wait", "300")  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    for _ in range(60):  # the old replicas drain while the new ones come up
        again = client.chat.completions.create(model="solo", messages=hello)
        if again.usage.completion_tokens == 3:
            break
    assert again.usage.completion_tokens == 3

    status = json.loads(cli(ray_head, "serve", "status", *addr, "--json").stdout)
    assert status["remote"]["status"] == "RUNNING"
    assert {d: s["status"] for d, s in status["remote"]["deployments"].items()} == {
        "ingress": "HEALTHY",
        "model": "HEALTHY",
    }

    missing = cli(ray_head, "serve", "shutdown", *addr, "--name", "nope", "--yes")
    assert missing.returncode == 1 and "no Serve application 'nope'" in missing.stderr
    down = cli(ray_head, "serve", "shutdown", *addr, "--name", "remote", "--yes")
    assert down.returncode == 0 and down.stdout.strip() == "shut down: remote", down.stderr
    for _ in range(60):
        left = json.loads(cli(ray_head, "serve", "status", *addr, "--json").stdout)
        if "remote" not in left:
            break
    assert "remote" not in left
