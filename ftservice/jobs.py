"""Submit ftservice runs to a Ray cluster over the Ray Jobs API, and follow them.

A submission id is derived from the resolved spec and the command, so submitting the same
spec twice finds the first job instead of starting a second run (`new=True` forces one).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ftservice
from ftservice.config import JobSpec, load_spec
from ftservice.errors import FtserviceError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# What Ray reads to leave files out of the uploaded working dir (with .gitignore)
IGNORE_FILES = (".rayignore", ".gitignore")


def _state(status) -> str:
    """JobStatus is a str enum; its value is the name people know (SUCCEEDED, ...)."""
    return getattr(status, "value", str(status))


class JobError(FtserviceError):
    """The cluster could not be reached, refused us, or has no such job."""


def _read_token(token: str | None, token_file: str | None) -> str | None:
    """The token from, in order: the argument, RAY_AUTH_TOKEN, a token file, ~/.ray/auth_token.

    Same order as Ray's own loader; ~/.ray/auth_token only counts when RAY_AUTH_MODE=token.
    """
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    path = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and not path and os.environ.get("RAY_AUTH_MODE") == "token":
        default = Path.home() / ".ray" / "auth_token"
        path = str(default) if default.is_file() else None
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise JobError(f"cannot read the Ray token file {path}: {e.strerror}.") from None
    return token or None


def connect(address: str | None = None, token: str | None = None, token_file: str | None = None):
    """A JobSubmissionClient for `address`, with one-line errors for the usual failures."""
    from ray.job_submission import JobSubmissionClient

    return dashboard_client(JobSubmissionClient, address, token, token_file)


def dashboard_client(kind, address: str | None, token: str | None, token_file: str | None):
    """A client of the cluster's dashboard (Ray's JobSubmissionClient or
    ServeSubmissionClient) with the cluster's token, and one-line errors."""
    from ray.exceptions import AuthenticationError

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    secret = _read_token(token, token_file)
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    try:
        return kind(address, headers=headers)
    except AuthenticationError as e:
        raise _auth_error(address, e, secret is not None) from None
    except ConnectionError:
        raise JobError(
            f"cannot reach a Ray cluster at {address}: is its head running and the dashboard "
            "port (default 8265) open? Pass --address http://HEAD:8265 or set RAY_ADDRESS."
        ) from None


def _auth_error(address: str, err: Exception, sent_token: bool) -> JobError:
    if "Authentication required" in str(err) or not sent_token:
        return JobError(
            f"the Ray cluster at {address} requires a token (401): set RAY_AUTH_TOKEN, or "
            "pass --token-file PATH (on the head, `ray get-auth-token` prints it)."
        )
    return JobError(
        f"the Ray cluster at {address} refused the token (403): it is not this cluster's "
        "token; get the current one on the head with `ray get-auth-token`."
    )


@dataclass(frozen=True)
class Submission:
    submission_id: str
    created: bool
    status: str


def entrypoint(spec_path: str, overrides: list[str], python: str = "python") -> str:
    """The command the job runs on the cluster: the same `ftservice train` as on a laptop.

    Inside a Ray job RAY_ADDRESS names the cluster, so the driver joins it rather than
    starting a Ray of its own. `output.registry` and `output.storage_path` should be storage
    every node sees (a shared filesystem or a bucket): the working dir is a temporary copy.
    `python`: the cluster's interpreter, found on its PATH unless a caller on the cluster
    itself knows it (the jobs API passes its replica's own).
    """
    command = [python, "-m", "ftservice", "train", spec_path, *overrides]
    return " ".join(shlex.quote(a) for a in command)


def submission_id(spec: JobSpec, command: str) -> str:
    """Stable id from the resolved spec and the command: same spec, same id."""
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True) + "\n" + command
    return f"ftservice-{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def runtime_env(spec: JobSpec, working_dir: Path) -> dict:
    """Working dir, pip requirements and env vars for the job's processes. What the upload
    leaves out is the working dir's own .rayignore and .gitignore (Ray reads both)."""
    env: dict = {
        "working_dir": str(working_dir),
        "env_vars": dict(spec.runtime.env_vars),
    }
    package = Path(ftservice.__file__).parent
    if not package.resolve().is_relative_to(working_dir.resolve()):
        # Ship this exact ftservice so the cluster runs the code that validated the spec.
        env["py_modules"] = [str(package)]
    if spec.runtime.pip:
        env["pip"] = list(spec.runtime.pip)
    return env


@dataclass(frozen=True)
class PreparedJob:
    """Everything a submission needs, checked before the cluster is contacted."""

    spec: JobSpec
    command: str
    base_id: str
    runtime_env: dict
    spec_file: str
    """The spec's path relative to the uploaded working dir."""


def prepare(spec_path: str, overrides: list[str], working_dir: Path | None = None) -> PreparedJob:
    """Validate the spec and derive the command, id and runtime env; no cluster needed."""
    spec = load_spec(spec_path, overrides, check_inputs=True)
    working_dir = (working_dir or Path.cwd()).resolve()
    spec_file = Path(spec_path).resolve()
    if not spec_file.is_relative_to(working_dir):
        raise JobError(
            f"{spec_path} is outside the working directory {working_dir}, which is what gets "
            "uploaded to the cluster; run `ftservice submit` from the project folder that "
            "holds the spec and its data."
        )
    rel = str(spec_file.relative_to(working_dir))
    if not any((working_dir / name).is_file() for name in IGNORE_FILES):
        print(
            f"ftservice submit: {working_dir} has no .rayignore or .gitignore, so Ray uploads "
            "all of it (outputs and weights too); add a .rayignore (gitignore syntax) naming "
            "what jobs do not need, as ftservice's own does.",
            file=sys.stderr,
        )
    command = entrypoint(rel, overrides)
    return PreparedJob(
        spec, command, submission_id(spec, command), runtime_env(spec, working_dir), rel
    )


def submit(job: PreparedJob, client, new: bool = False) -> Submission:
    """Submit the job, or find the one already submitted for the same spec."""
    existing = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
    if not new and job.base_id in existing:
        return Submission(job.base_id, False, _state(existing[job.base_id].status))
    sid, n = job.base_id, 1
    while sid in existing:
        n += 1
        sid = f"{job.base_id}-{n}"
    client.submit_job(
        entrypoint=job.command,
        submission_id=sid,
        runtime_env=job.runtime_env,
        metadata={"ftservice.name": job.spec.name, "ftservice.spec": job.spec_file},
    )
    return Submission(sid, True, "PENDING")


def _job_call(client, fn, job_id: str):
    try:
        return fn(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise JobError(
                f"no job '{job_id}' on this cluster; `ftservice list` shows the jobs it has."
            ) from None
        raise


def status(client, job_id: str) -> dict:
    info = _job_call(client, client.get_job_info, job_id)
    return {
        "submission_id": info.submission_id,
        "status": _state(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata or {},
    }


def logs(client, job_id: str, follow: bool = False, out=sys.stdout) -> None:
    if not follow:
        out.write(_job_call(client, client.get_job_logs, job_id))
        return
    _job_call(client, client.get_job_info, job_id)

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def stop(client, job_id: str, wait_s: float = 30.0) -> str:
    """Ask the job to stop and wait (up to wait_s) until it reaches a terminal state."""
    _job_call(client, client.stop_job, job_id)
    return wait(client, job_id, wait_s)


def list_jobs(client) -> list[dict]:
    rows = []
    for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
        rows.append(
            {
                "submission_id": j.submission_id or j.job_id,
                "status": _state(j.status),
                "name": (j.metadata or {}).get("ftservice.name", ""),
                "start_time": j.start_time,
                "entrypoint": j.entrypoint,
            }
        )
    return rows


def wait(client, job_id: str, timeout_s: float) -> str:
    """Poll until the job ends or timeout_s passes; returns the last status."""
    deadline = time.monotonic() + timeout_s
    state = _state(client.get_job_status(job_id))
    while state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        state = _state(client.get_job_status(job_id))
    return state
