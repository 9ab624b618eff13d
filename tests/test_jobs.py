"""Cluster job submission against a real local Ray head with token auth on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama) -> Path:
    """A user's project folder: a short training spec on a local model, with its data; the
    registry is outside the project (the job's working dir is a temporary copy)."""
    root = tmp_path_factory.mktemp("project")
    (root / "jobs").mkdir()
    (root / "data").mkdir()
    for name, source, n in [
        ("train", "data/domain/train.jsonl", 16),
        ("eval", "data/domain/eval.jsonl", 2),
        ("general", "data/general/prompts.jsonl", 2),
    ]:
        lines = (REPO / source).read_text().splitlines()[:n]
        (root / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    registry = tmp_path_factory.mktemp("shared") / "artifacts"
    (root / "jobs" / "tiny.yaml").write_text(
        f"name: tinyjob\nmodel:\n  name: {tiny_llama}\n"
        "data:\n  train: [data/train.jsonl]\n  max_seq_length: 96\n"
        "train:\n  max_steps: 2\n  micro_batch_size: 4\n"
        "scaling:\n  cpus_per_worker: 1\n"
        "eval:\n  domain: data/eval.jsonl\n  general: data/general.jsonl\n  max_new_tokens: 4\n"
        f"output:\n  registry: {registry}\n  storage_path: {registry.parent / 'runs'}\n"
        "runtime:\n  env_vars:\n    FTSERVICE_MARK: from-the-spec\n"
    )
    return root


def cli(head, *args, cwd=None, token: str | None = "head") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(head.home)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = head.token if token == "head" else token
    return subprocess.run(
        [sys.executable, "-m", "ftservice", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def project_registry(project: Path) -> str:
    import yaml

    return yaml.safe_load((project / "jobs" / "tiny.yaml").read_text())["output"]["registry"]


def test_submit_runs_on_the_cluster_and_resubmitting_finds_the_same_job(ray_head, project):
    addr = ["--address", ray_head.address]
    first = cli(ray_head, "submit", "jobs/tiny.yaml", *addr, "--wait", "300", cwd=project)
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = first.stdout.split()[1]
    assert job_id.startswith("ftservice-tinyjob-")
    assert f"{job_id}: SUCCEEDED" in first.stdout

    status = json.loads(cli(ray_head, "status", job_id, *addr, "--json").stdout)
    assert status["status"] == "SUCCEEDED"
    assert status["metadata"]["ftservice.spec"] == "jobs/tiny.yaml"
    assert status["entrypoint"] == "python -m ftservice train jobs/tiny.yaml"

    # the job trained on the cluster: its report is in the logs, its artifact in the registry
    logs = cli(ray_head, "logs", job_id, *addr).stdout
    assert "over 2 steps" in logs, logs[-3000:]
    registry = Path(project_registry(project))
    metas = [json.loads(p.read_text()) for p in registry.glob("*/ftservice.json")]
    assert [m["metrics"]["global_step"] for m in metas] == [2]
    assert metas[0]["spec"]["runtime"]["env_vars"] == {"FTSERVICE_MARK": "from-the-spec"}
    followed = cli(ray_head, "logs", job_id, *addr, "--follow").stdout
    assert "over 2 steps" in followed

    again = cli(ray_head, "submit", "jobs/tiny.yaml", *addr, cwd=project)
    assert again.returncode == 0
    assert again.stdout.startswith(f"already submitted as {job_id} (SUCCEEDED)")

    forced = cli(ray_head, "submit", "jobs/tiny.yaml", *addr, "--new", cwd=project)
    assert forced.stdout.strip() == f"submitted {job_id}-2"

    changed = cli(ray_head, "submit", "jobs/tiny.yaml", "lora.r=4", *addr, cwd=project)
    other_id = changed.stdout.split()[1]
    assert other_id.startswith("ftservice-tinyjob-") and other_id != job_id

    listed = json.loads(cli(ray_head, "list", *addr, "--json").stdout)
    ids = [row["submission_id"] for row in listed]
    assert {job_id, f"{job_id}-2", other_id} <= set(ids)


def test_stop_a_long_job(ray_head):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        ray_head.address, headers={"Authorization": f"Bearer {ray_head.token}"}
    )
    job_id = client.submit_job(entrypoint="sleep 600")
    stopped = cli(ray_head, "stop", job_id, "--address", ray_head.address)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{job_id}: STOPPED"
    assert str(client.get_job_status(job_id).value) == "STOPPED"


def test_token_is_required_and_checked(ray_head):
    addr = ["--address", ray_head.address]
    missing = cli(ray_head, "list", *addr, token=None)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"error: the Ray cluster at {ray_head.address} requires a token (401): set "
        "RAY_AUTH_TOKEN, or pass --token-file PATH (on the head, `ray get-auth-token` prints it)."
    )
    wrong = cli(ray_head, "list", *addr, token="not-the-token")
    assert wrong.returncode == 1
    assert "refused the token (403)" in wrong.stderr and "\n" not in wrong.stderr.strip()


def test_token_from_a_file(ray_head, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(ray_head.token + "\n")
    result = cli(
        ray_head,
        "list",
        "--address",
        ray_head.address,
        "--token-file",
        str(token_file),
        token=None,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SUBMISSION_ID")


def test_unreachable_cluster_and_unknown_job(ray_head):
    nobody = f"http://127.0.0.1:{free_port()}"
    down = cli(ray_head, "status", "x", "--address", nobody)
    assert down.returncode == 1
    assert down.stderr.startswith(f"error: cannot reach a Ray cluster at {nobody}")
    unknown = cli(ray_head, "status", "no-such-job", "--address", ray_head.address)
    assert unknown.returncode == 1
    assert "no job 'no-such-job' on this cluster" in unknown.stderr


def test_spec_outside_the_working_dir_is_refused(ray_head, project, tmp_path):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(  # a valid spec whose inputs exist: only its place is wrong
        "name: x\nmodel:\n  name: smollm2-135m-instruct\ndata:\n  train: [data/train.jsonl]\n"
        "eval:\n  domain: null\n  general: null\n"
    )
    result = cli(ray_head, "submit", str(outside), "--address", ray_head.address, cwd=project)
    assert result.returncode == 1
    assert "is outside the working directory" in result.stderr
