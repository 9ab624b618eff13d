"""Shared fixtures: an isolated HOME, a tiny random-init Llama, and a real local Ray head."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
# Converted built-in models are big (540 MB) and slow to make (40 s): share one cache across
# test runs in the checkout (ignored by git) unless the caller chose another.
os.environ.setdefault("FTSERVICE_CACHE", str(REPO / ".cache" / "ftservice"))


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """HOME and temp dirs under tmp_path, so nothing touches the user's ~/.ray or caches."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    return home


@pytest.fixture(scope="session")
def builtin_model():
    from ftservice.config import ModelSpec
    from ftservice.models import resolve_model

    return resolve_model(ModelSpec(name="smollm2-135m-instruct"))


def make_tiny_llama(
    folder: Path,
    tokenizer_from: Path,
    seed: int = 0,
    head_dim: int | None = None,
    initializer_range: float = 0.02,
) -> Path:
    """A 2-layer random-init Llama with the SmolLM2 tokenizer, saved as safetensors.
    `head_dim`: wider heads than hidden/heads (vLLM's CPU attention wants 64 or more);
    `initializer_range`: 0.1 gives a model whose greedy answers are words (at 0.02 they are
    newlines only)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **({"head_dim": head_dim} if head_dim else {}),
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(builtin_model, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), builtin_model.path)


@pytest.fixture(scope="session")
def chatty(builtin_model, tmp_path_factory) -> Path:
    """A tiny random Llama whose greedy answers are words (the default init answers with
    newlines only, which leaves no replay tokens)."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("chatty"), builtin_model.path, initializer_range=0.1
    )


def write_replay_answers(model: Path, folder: Path, prompts: int, max_new_tokens: int) -> Path:
    """The model's greedy answers to the first `prompts` shipped replay prompts, written as the
    replay cache holds them (empty answers left out)."""
    import json

    from ftservice.config import ModelSpec
    from ftservice.evaluate import load_prompts
    from ftservice.models import resolve_model
    from ftservice.train.replay import base_answers

    cpu = {"device": "cpu", "dtype": "float32", "quantization": None, "gpus": 0}
    asked = load_prompts(str(REPO / "data/general/replay.jsonl"))[:prompts]
    answers = base_answers(resolve_model(ModelSpec(name=str(model))), asked, max_new_tokens, cpu, 2)
    path = folder / "replay.jsonl"
    path.write_text(
        "".join(
            json.dumps({"messages": [*p, {"role": "assistant", "content": a}]}) + "\n"
            for p, a in zip(asked, answers, strict=True)
            if a.strip()
        )
    )
    return path


@pytest.fixture(scope="session")
def other_tiny_llama(builtin_model, tmp_path_factory) -> Path:
    """The same shape with other weights: another base model (another fingerprint)."""
    return make_tiny_llama(tmp_path_factory.mktemp("other-llama"), builtin_model.path, seed=1)


@pytest.fixture
def short_tmp():
    """A short folder under /tmp for Ray's sockets (AF_UNIX paths are limited to 107 bytes,
    and pytest's tmp_path can be longer than that once Ray appends its session folders)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ftr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cli_env(tmp_path, short_tmp):
    """Environment for an `ftservice` subprocess that starts its own local Ray: its own HOME,
    short Ray temp dir, auth off, and none of the caller's RAY_* settings."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    yield env | {"HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(short_tmp)}
    # every process the test's commands started (their local Ray's included) has ended once
    # they returned; what is still running after a grace period is a leak: named, then stopped
    entry = f"RAY_TMPDIR={short_tmp}"
    deadline = time.monotonic() + 15
    while _processes_with_env(entry) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [_describe(p) for p in _processes_with_env(entry)]
    for pid in _processes_with_env(entry):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert left == [], f"the test's commands left processes behind: {left}"


def _processes_with_env(entry: str) -> list[int]:
    needle = entry.encode() + b"\0"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes() and not _is_zombie(int(proc.name)):
                pids.append(int(proc.name))
        except (OSError, ProcessLookupError):
            pass
    return pids


def _describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return str(pid)
    return f"{pid} {command[:120].decode(errors='replace')}"


def short_dir(prefix: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _kill_session(sid: int) -> None:
    """Stop every process of a session: TERM, a grace period, then KILL what is left."""
    for sig, grace in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            alive = [p for p in _session_pids(sid) if not _is_zombie(p)]
            if not alive:
                return
            time.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class RayHead:
    """A real local Ray head (`ray start --head --block`) with token auth on."""

    def __init__(self, root: Path, num_cpus: int = 2):
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        self.ray_tmp = short_dir("ftr-head-")
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{free_port()}"  # what ray.init and RAY_ADDRESS take
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "TMPDIR": str(root),
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.log = open(root / "head.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                f"{bin_dir}/ray",
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_address.split(':')[1]}",
                f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={free_port()}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                f"--temp-dir={self.ray_tmp}",
                "--disable-usage-stats",
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: teardown kills exactly what it started
            # Ctrl-C stops it (stop()), even where this process was started in the background
            # by a shell, which ignores SIGINT and passes that on
            preexec_fn=_default_sigint,
        )
        self.sid = self.proc.pid

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        req = urllib.request.Request(
            f"{self.address}/api/version", headers={"Authorization": f"Bearer {self.token}"}
        )
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {(self.root / 'head.log').read_text()}")
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"ray head not ready in {timeout_s}s")

    def stop(self) -> list[str]:
        """Stop the head as its operator would (Ctrl-C to `ray start --block`, which stops
        what it started) and wait for its session to empty; what is still running after the
        grace period is returned (pid and command line) and then killed."""
        import shutil

        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while self.leftover() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [_describe(p) for p in self.leftover()]
        _kill_session(self.sid)
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left

    def leftover(self) -> list[int]:
        return [p for p in _session_pids(self.sid) if not _is_zombie(p)]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("ray-head"))
    left = ["not stopped"]
    try:
        head.wait_ready()
        yield head
    finally:
        left = head.stop()
    assert left == [], f"the ray head left processes behind: {left}"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """The embedded local Ray (ray.init in this process), HOME and temp dirs isolated."""
    import shutil

    import ray

    root = tmp_path_factory.mktemp("local-ray")
    (root / "home").mkdir()
    ray_tmp = short_dir("ftr-local-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(
            num_cpus=2,
            dashboard_port=free_port(),  # Ray Train's state queries need the dashboard
            _temp_dir=str(ray_tmp),
            logging_level="warning",
        )
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def kill_driver_then_rerun(tmp_path: Path, env: dict, spec) -> dict:
    """Start `ftservice train` on the spec, kill its whole session (driver and the local Ray
    it started) once Ray has registered a checkpoint, run the same command again; returns
    the second run's JSON (artifact path and metadata)."""
    import json

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))  # JSON is YAML
    cmd = [sys.executable, "-m", "ftservice", "train", str(spec_file), "--no-evaluate", "--json"]
    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    runs = Path(spec.output.storage_path)
    deadline = time.monotonic() + 300
    # a checkpoint counts once Ray has registered it (its snapshot names it)
    while not list(runs.glob("*/checkpoint_manager_snapshot.json")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    _kill_session(first.pid)
    first.wait(timeout=30)
    assert list(runs.glob("*/checkpoint_*")), "no checkpoint was written before the deadline"
    registry = Path(spec.output.registry)
    assert not registry.exists() or not any(registry.iterdir())  # the killed run published nothing

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    return json.loads(second.stdout[second.stdout.index("{\n") :])


PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def store(request, tmp_path):
    """The service's store on a SQLite file, and in a schema of its own on the local
    PostgreSQL (dropped after)."""
    from ftservice.store.db import open_store

    if request.param == "sqlite":
        yield open_store(f"sqlite:///{tmp_path / 'state' / 'ftservice.db'}")
        return
    schema = f"ftservice_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield open_store(PG, schema=schema)
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
