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
        "eval:\n  domain: null\n  general: null\n"  # (the evaluation is not what this tests)
        f"output:\n  registry: {registry}\n  storage_path: {registry.parent / 'runs'}\n"
        "runtime:\n  env_vars:\n    FTSERVICE_MARK: from-the-spec\n"
    )
    # what the project's .rayignore leaves out of the upload
    (root / ".rayignore").write_text("runs/\nnotes.txt\n")
    (root / "runs").mkdir()
    (root / "runs" / "old.safetensors").write_bytes(b"\0" * 1024)
    (root / "notes.txt").write_text("not for the cluster")
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
    # the working dir the job ran in: the spec and data, not what .rayignore names
    unpacked_dirs = ray_head.ray_tmp.glob("session_*/runtime_resources/working_dir_files/*")
    unpacked = [d for d in unpacked_dirs if (d / "jobs" / "tiny.yaml").is_file()]
    assert unpacked
    for folder in unpacked:
        assert (folder / "data" / "train.jsonl").is_file() and (folder / ".rayignore").is_file()
        assert not (folder / "runs").exists() and not (folder / "notes.txt").exists()

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
    for extra in (f"{job_id}-2", other_id):  # checked: they need not train on the module's CPUs
        stopped = cli(ray_head, "stop", extra, *addr)
        assert stopped.returncode == 0, stopped.stderr


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
    err = missing.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert ray_head.address in err and "401" in err, err
    assert "RAY_AUTH_TOKEN" in err and "--token-file" in err, err
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


def test_the_jobs_api_restarted_mid_job_still_tracks_it_to_its_end(ray_head, tmp_path, tiny_llama):
    """The serving app on a Ray started with `ray start --head` (the embedded Ray would end
    with the app), itself run there as a Ray Job: stop it while a fine-tuning job runs,
    start it again, and the fine-tuning job, a Ray Job of its own, is still tracked to its
    end from the store."""
    import shlex
    import time

    import openai
    import yaml

    from ftservice.jobs import connect
    from ftservice.store.db import open_store
    from ftservice.store.keys import create_key

    (tmp_path / "registry").mkdir()
    store_url = f"sqlite:///{tmp_path / 'state' / 'ftservice.db'}"
    port = free_port()
    spec = tmp_path / "serve.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "api", "model": {"name": str(tiny_llama)}, "base_name": "tiny",
        "registries": [str(tmp_path / "registry")], "port": port,
        "replicas": {"num": 1, "cpus": 0.25, "ingress_cpus": 0.1},
        "store": {"url": store_url},
        "jobs": {"storage": str(tmp_path / "jobs"),
                 "defaults": {"scaling.num_workers": 0, "data.max_seq_length": 96}},
    }))  # fmt: skip
    secret = create_key(open_store(store_url), "team", ["jobs", "inference"], project="team")
    ray_jobs = connect(ray_head.address, token=ray_head.token)
    command = f"{shlex.quote(sys.executable)} -m ftservice serve run {shlex.quote(str(spec))}"

    def start(n: int) -> str:
        sid = ray_jobs.submit_job(entrypoint=command, submission_id=f"api-{n}")
        deadline = time.monotonic() + 300
        while "Ctrl-C stops it." not in (logs := ray_jobs.get_job_logs(sid)):
            assert ray_jobs.get_job_status(sid).is_terminal() is False, logs[-3000:]
            assert time.monotonic() < deadline, logs[-3000:]
            time.sleep(1)
        return sid

    def stop(sid: str) -> None:
        ray_jobs.stop_job(sid)
        deadline = time.monotonic() + 120
        while not ray_jobs.get_job_status(sid).is_terminal():
            assert time.monotonic() < deadline, "the API did not stop"
            time.sleep(1)

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0)
    running = start(1)
    try:
        lines = (REPO / "data/domain/train.jsonl").read_text().splitlines(keepends=True)[:16]
        training = api.files.create(file=("t.jsonl", "".join(lines).encode()),
                                    purpose="fine-tune")  # fmt: skip
        job = api.fine_tuning.jobs.create(
            model="tiny", training_file=training.id,
            extra_body={"ftservice": {"train.max_steps": 40}},
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job.id)):
            assert time.monotonic() < deadline, "the job never logged a step"
            time.sleep(1)
        stop(running)  # the API goes away mid-job
        with pytest.raises(openai.APIConnectionError):
            api.fine_tuning.jobs.retrieve(job.id)
        running = start(2)
        deadline = time.monotonic() + 600
        while (found := api.fine_tuning.jobs.retrieve(job.id)).status in ("queued", "running"):
            assert time.monotonic() < deadline, "the job was not tracked to its end"
            time.sleep(1)
        assert found.status == "succeeded", found.error
        assert (tmp_path / "registry" / found.fine_tuned_model / "ftservice.json").is_file()
        losses = [e for e in api.fine_tuning.jobs.list_events(job.id, limit=1000)
                  if e.type == "metrics" and "loss" in (e.data or {})]  # fmt: skip
        assert sorted(e.data["step"] for e in losses) == list(range(1, 41))
    finally:
        stop(running)
