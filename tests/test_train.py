"""Training on a real local Ray with a tiny random-init Llama: every method really learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftservice.artifacts import META, ArtifactError, load_artifact, publish
from ftservice.config import spec_from_dict
from ftservice.data.loaders import DataError
from ftservice.train.driver import check_data

REPO = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict:
    """32 domain examples to train on, 6 held-out questions, 6 general prompts."""
    root = tmp_path_factory.mktemp("train-data")
    lines = (REPO / "data/domain/train.jsonl").read_text().splitlines()[:32]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    evals = (REPO / "data/domain/eval.jsonl").read_text().splitlines()[:6]
    (root / "eval.jsonl").write_text("\n".join(evals) + "\n")
    general = (REPO / "data/general/prompts.jsonl").read_text().splitlines()[:6]
    (root / "general.jsonl").write_text("\n".join(general) + "\n")
    return {k: str(root / f"{k}.jsonl") for k in ("train", "eval", "general")}


def make_spec(tmp_path: Path, tiny_llama: Path, data: dict, **overrides):
    spec = {
        "name": "tiny",
        "model": {"name": str(tiny_llama)},
        "data": {"train": [data["train"]], "max_seq_length": 96},
        "train": {"learning_rate": 5e-3, "micro_batch_size": 8, "max_steps": 8, "warmup_ratio": 0},
        "checkpoint": {"every_steps": 4, "num_to_keep": 1},
        "eval": {"domain": data["eval"], "general": data["general"], "max_new_tokens": 6},
        "output": {"registry": str(tmp_path / "registry"), "storage_path": str(tmp_path / "runs")},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec_from_dict(spec)


def initial_adapter(spec, tiny_llama) -> dict[str, torch.Tensor]:
    """The adapter as the worker initialises it (same seed), before any step."""
    from peft import get_peft_model_state_dict
    from transformers import set_seed

    from ftservice.models import build_model, resolve_model

    set_seed(spec.train.seed)
    model = build_model(spec, resolve_model(spec.model))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_learned(result, n_steps: int) -> None:
    m = result.artifact.meta.metrics
    assert m["global_step"] == n_steps
    assert m["last_loss"] < m["first_loss"], m


def assert_artifact_contract(artifact, adapter: bool) -> None:
    files = {p.name for p in artifact.path.iterdir()}
    weights = "adapter_model.safetensors" if adapter else "model.safetensors"
    assert {weights, "tokenizer.json", "chat_template.jinja", META, "loss.png"} <= files
    if adapter:
        assert "adapter_config.json" in files
    meta = json.loads((artifact.path / META).read_text())
    assert set(meta) >= {
        "spec", "base_model", "dataset_fingerprint", "metrics", "parent", "created", "run_name",
    }  # fmt: skip
    assert len(meta["base_model"]["fingerprint"]) == 64
    assert len(meta["dataset_fingerprint"]) == 64
    assert (artifact.path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert load_artifact(str(artifact.path)).name == artifact.name


def assert_evaluation(evaluation: dict, data: dict) -> None:
    """The evaluation ran on the spec's sets, its numbers agree with each other, and it sees
    the trained adapter: the domain answers' loss fell below the base's, and the tuned model's
    next-token distributions on the base's own answers differ from the base's."""
    from ftservice.data.judges import answer_matches

    lines = {k: len(Path(data[k]).read_text().splitlines()) for k in ("eval", "general")}
    f = evaluation["forgetting"]
    assert f["prompts"] == lines["general"] and f["answer_tokens"] > 0
    assert f["kl_base_from_itself"] == pytest.approx(0.0, abs=1e-6)
    assert f["kl_from_base"] > 1e-4 and f["perplexity_tuned"] != f["perplexity_base"]
    domain, base = evaluation["domain"], evaluation["domain_base"]
    assert domain["total"] == base["total"] == lines["eval"]
    assert domain["accuracy"] == domain["correct"] / domain["total"]
    assert all(e["correct"] == answer_matches(e["answer"], e["reference"])
               for e in domain["examples"])  # fmt: skip
    assert domain["loss"] < base["loss"], (domain["loss"], base["loss"])


@pytest.mark.slow
def test_lora_learns_changes_every_adapter_weight_and_publishes(
    local_ray, tmp_path, chatty, small_data
):
    from ftservice.train.driver import train

    # the tiny model whose answers are words: its drift on the general prompts is measurable
    spec = make_spec(tmp_path, chatty, small_data, lora={"r": 4, "alpha": 8})
    before = initial_adapter(spec, chatty)
    base_weights = _digest(chatty / "model.safetensors")
    result = train(spec)
    assert_learned(result, 8)
    assert_artifact_contract(result.artifact, adapter=True)
    after = load_file(result.artifact.path / "adapter_model.safetensors")
    assert set(after) == set(before) and after
    unchanged = [k for k in after if torch.equal(after[k], before[k])]
    assert unchanged == []  # every trainable parameter moved
    assert_evaluation(result.evaluation, small_data)
    # the base stays frozen: the artifact holds adapter weights only, the base file is the same
    assert [k for k in after if "lora_" not in k] == []
    assert _digest(chatty / "model.safetensors") == base_weights


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_nan_and_publishes_nothing(
    local_ray, tmp_path, tiny_llama, small_data
):
    from ftservice.train.driver import TrainingDiverged, train

    # an absurd learning rate overflows the adapter weights within a few steps
    spec = make_spec(
        tmp_path, tiny_llama, small_data,
        train={"learning_rate": 1e30, "max_steps": 40, "precision": "fp32"},
        checkpoint={"every_steps": 50},
    )  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at step \d+") as caught:
        train(spec, evaluate=False)
    assert 1 <= caught.value.step < 10  # stopped at once, not after the 40 steps
    assert "train.learning_rate (now 1e+30)" in str(caught.value)
    assert not (tmp_path / "registry").exists() or not any((tmp_path / "registry").iterdir())


@pytest.mark.slow
def test_qlora_trains_adapters_on_a_4bit_base(local_ray, tmp_path, tiny_llama, small_data):
    import bitsandbytes as bnb

    from ftservice.models import build_model, resolve_model
    from ftservice.train.driver import train

    spec = make_spec(tmp_path, tiny_llama, small_data, method="qlora", lora={"r": 4, "alpha": 8})
    model = build_model(spec, resolve_model(spec.model))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert all(m.weight.quant_type == "nf4" for m in four_bit)
    assert all(m.weight.quant_state.nested for m in four_bit)  # double quantisation
    result = train(spec, evaluate=False)  # the evaluation is not what this tests
    assert_learned(result, 8)
    assert_artifact_contract(result.artifact, adapter=True)
    after = load_file(result.artifact.path / "adapter_model.safetensors")
    before = initial_adapter(spec, tiny_llama)
    assert [k for k in after if torch.equal(after[k], before[k])] == []


@pytest.mark.slow
def test_full_finetune_under_zero3_on_two_workers(local_ray, tmp_path, tiny_llama, small_data):
    from transformers import AutoModelForCausalLM

    from ftservice.train.driver import train

    spec = make_spec(
        tmp_path,
        tiny_llama,
        small_data,
        method="full",
        train={"learning_rate": 1e-3, "micro_batch_size": 4},
        scaling={"num_workers": 2, "cpus_per_worker": 1, "deepspeed": {"stage": 3}},
    )
    result = train(spec, evaluate=False)  # the evaluation is not what this tests
    assert_learned(result, 8)
    assert_artifact_contract(result.artifact, adapter=False)
    history = json.loads((result.artifact.path / "log_history.json").read_text())
    assert history  # the loss curve's data travels with the artifact
    tuned = AutoModelForCausalLM.from_pretrained(result.artifact.path)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base_state = base.state_dict()
    same = [k for k, v in tuned.state_dict().items() if torch.equal(v, base_state[k])]
    assert same == []  # every parameter trained, and the consolidated weights load
    part = result.artifact.meta.metrics["partition"]
    assert part["world_size"] == 2
    # each rank owns half of every parameter (DeepSpeed pads shards to equal sizes)
    assert part["parameters_local"] == pytest.approx(part["parameters_total"] / 2, rel=0.02)


def test_sft_refuses_preference_data_before_any_worker_starts(tmp_path, tiny_llama):
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "A", "rejected": "B"}])
    spec = spec_from_dict(
        {"name": "x", "model": {"name": str(tiny_llama)}, "data": {"train": [str(prefs)]}}
    )
    with pytest.raises(DataError) as err:
        check_data(spec)
    assert "stage 'sft' cannot learn from" in str(err.value)
    assert "preference pairs train with stage: dpo" in str(err.value)


def test_publish_refuses_an_empty_adapter_and_leaves_the_registry_clean(tmp_path):
    from safetensors.torch import save_file

    from ftservice.artifacts import BaseModelRef

    BASE = BaseModelRef(name="m", fingerprint="0" * 64, kind="folder")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "adapter_config.json").write_text("{}")
    save_file({}, staged / "adapter_model.safetensors")
    registry = tmp_path / "registry"
    with pytest.raises(ArtifactError, match=r"no tensors|empty"):
        publish(
            registry, "x", staged, spec={"method": "lora", "stage": "sft"}, run_name="r",
            base_model=BASE, dataset_fingerprint="", data=[], metrics={}, log_history=[],
        )  # fmt: skip
    assert not registry.exists() or list(registry.iterdir()) == []
    save_file({"w": torch.tensor([float("nan")])}, staged / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match="NaN"):
        publish(
            registry, "x", staged, spec={"method": "lora", "stage": "sft"}, run_name="r",
            base_model=BASE, dataset_fingerprint="", data=[], metrics={}, log_history=[],
        )  # fmt: skip
    assert not registry.exists() or list(registry.iterdir()) == []


@pytest.mark.slow
def test_killed_driver_resumes_from_its_checkpoint(tmp_path, cli_env, tiny_llama, small_data):
    """Kill the whole driver (and the local Ray it started) after the first checkpoint; the
    same command resumes that run instead of starting again."""
    from conftest import kill_driver_then_rerun

    spec = make_spec(
        tmp_path, tiny_llama, small_data, train={"max_steps": 12}, checkpoint={"every_steps": 4}
    )
    meta = kill_driver_then_rerun(tmp_path, cli_env, spec)
    assert meta["metrics"]["global_step"] == 12
    log = json.loads((Path(meta["artifact"]) / "log_history.json").read_text())
    steps = [h["step"] for h in log if "loss" in h]
    assert steps[-1] == 12
    assert meta["metrics"]["resumed"] is True


@pytest.mark.slow
def test_quickstart_spec_runs_briefly_through_the_cli(tmp_path, cli_env):
    import subprocess
    import sys

    env = cli_env
    replay = tmp_path / "replay.jsonl"  # 4 of the replay prompts: the base answers them first
    replay.write_text("".join((REPO / "data/general/replay.jsonl").open().readlines()[:4]))
    result = subprocess.run(
        [sys.executable, "-m", "ftservice", "train", "cluster/jobs/quickstart.yaml",
         f"output.registry={tmp_path / 'reg'}", f"output.storage_path={tmp_path / 'runs'}",
         f"data.replay.prompts={replay}", "--max-steps", "2", "--eval-limit", "3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "over 2 steps" in out and "domain score:" in out and "forgetting:" in out
    assert "replay:        4 base answers, " in out and "(taught by KL to the base × " in out, out
    assert f"artifact:      {tmp_path / 'reg' / 'quickstart'}" in out


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint(
    local_ray, tmp_path, tiny_llama, small_data
):
    import os
    import signal
    import threading
    import time

    import psutil

    from ftservice.train.driver import train

    spec = make_spec(
        tmp_path, tiny_llama, small_data,
        train={"max_steps": 12}, checkpoint={"every_steps": 4, "max_failures": 1, "num_to_keep": 2},
    )  # fmt: skip
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if list((tmp_path / "runs").glob("*/checkpoint_manager_snapshot.json")):
                for p in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in p.info["cmdline"] or []):
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = train(spec, evaluate=False)
    killer.join()
    assert killed, "the worker was never killed"
    m = result.artifact.meta.metrics
    assert m["resumed"] is True and m["global_step"] == 12
    log = json.loads((result.artifact.path / "log_history.json").read_text())
    steps = [h["step"] for h in log if "loss" in h]
    assert steps == list(range(1, 13))  # restored history + the rest: nothing lost, nothing twice
    # num_to_keep bounds what stays on disk (Ray's checkpoint folders, whatever their names)
    kept = [f for run in (tmp_path / "runs").iterdir() if run.is_dir()
            for f in run.iterdir() if f.is_dir() and f.name.startswith("checkpoint")]  # fmt: skip
    assert 1 <= len(kept) <= 2, kept


class Placed(Exception):
    """Raised where transformers would load weights: what it was asked is what counts."""


def stop_at_load(monkeypatch) -> dict:
    """The keyword arguments the next `AutoModelForCausalLM.from_pretrained` gets (the load
    itself stops there with Placed: no GPU is needed to see where it would go)."""
    import transformers

    seen: dict = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Placed

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return seen


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_qlora_worker_on_a_gpu_quantises_its_base_onto_that_gpu(
    monkeypatch, tmp_path, tiny_llama, stage
):
    """What the worker does (`build(..., device=worker_device(spec))`), with Ray Train naming
    cuda:0 as this worker's device: the 4-bit base is loaded there, since the HF Trainer never
    moves a quantised model. No GPU is needed: the load is stopped at from_pretrained."""
    import ray.train.torch

    from ftservice.config import JobSpec
    from ftservice.models import load_tokenizer, resolve_model
    from ftservice.train import dpo, sft
    from ftservice.train.common import worker_device

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda:0"))
    data = REPO / ("data/domain/train.jsonl" if stage == "sft" else "data/preference/seeds.jsonl")
    spec = JobSpec.model_validate({
        "name": "q", "stage": stage, "method": "qlora", "model": {"name": str(tiny_llama)},
        "data": {"train": [str(data)], "max_seq_length": 64},
        "scaling": {"use_gpu": True, "num_workers": 1},
    })  # fmt: skip
    model = resolve_model(spec.model)
    build = sft.sft_trainer if stage == "sft" else dpo.dpo_trainer
    seen = stop_at_load(monkeypatch)
    with pytest.raises(Placed):
        build(spec, model, None, load_tokenizer(model), str(tmp_path), 1, [],
              device=worker_device(spec))  # fmt: skip
    assert seen["device_map"] == {"": "cuda:0"}
    assert seen["quantization_config"].load_in_4bit
    # on CPU workers, and for ZeRO-3's full fine-tuning, nothing is placed by the loader
    assert worker_device(spec.model_copy(update={"scaling": spec.scaling.model_copy(
        update={"use_gpu": False})})) is None  # fmt: skip
    assert worker_device(spec.model_copy(update={"method": "full"})) is None


def test_evaluation_holds_the_models_as_the_training_worker_did(monkeypatch, tiny_llama):
    """A QLoRA job on GPUs is evaluated on a GPU, in its training dtype, on the 4-bit base
    (not on the CPU in fp32, which for the 70B spec needs ~280 GB of RAM)."""

    from ftservice.config import JobSpec
    from ftservice.evaluate import eval_placement, evaluate_artifact_folder

    spec = JobSpec.model_validate({
        "name": "q", "method": "qlora", "model": {"name": str(tiny_llama)},
        "train": {"precision": "bf16"}, "scaling": {"use_gpu": True},
    })  # fmt: skip
    placement = eval_placement(spec)
    assert placement["device"] == "cuda" and placement["dtype"] == "bfloat16"
    assert placement["quantization"]["quant_type"] == "nf4"
    # without a GPU in this process, the evaluation says so instead of running on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        evaluate_artifact_folder(str(tiny_llama), str(tiny_llama), True, None, None, 4,
                                 placement=placement)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = stop_at_load(monkeypatch)
    with pytest.raises(Placed):
        evaluate_artifact_folder(str(tiny_llama), str(tiny_llama), True, None, None, 4,
                                 placement=placement)  # fmt: skip
    assert seen["device_map"] == {"": "cuda"} and seen["dtype"] == torch.bfloat16
    assert seen["quantization_config"].load_in_4bit
    on_cpu = spec.scaling.model_copy(update={"use_gpu": False})
    cpu = eval_placement(spec.model_copy(update={"method": "lora", "scaling": on_cpu}))
    assert cpu == {"device": "cpu", "dtype": "float32", "quantization": None, "gpus": 0}
    # full fine-tuning on 16 GPUs of 8-GPU nodes: base and tuned spread over one node's 8
    full = JobSpec.model_validate({
        "name": "f", "method": "full", "model": {"name": str(tiny_llama)},
        "train": {"precision": "bf16"}, "scaling": {"use_gpu": True, "num_workers": 16},
        "cluster": {"max_nodes": 2, "gpus_per_node": 8},
    })  # fmt: skip
    placement = eval_placement(full)
    assert placement == {"device": "auto", "dtype": "bfloat16", "quantization": None, "gpus": 8}
    seen.clear()
    with pytest.raises(Placed):
        evaluate_artifact_folder(str(tiny_llama), str(tiny_llama), False, None, None, 4,
                                 placement=placement)  # fmt: skip
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16
    assert "quantization_config" not in seen


def test_qlora_can_keep_its_unquantised_weights_in_bf16(tmp_path, tiny_llama, small_data):
    from ftservice.models import build_model, resolve_model

    spec = make_spec(tmp_path, tiny_llama, small_data, method="qlora", lora={"r": 4, "alpha": 8})
    kept = make_spec(tmp_path, tiny_llama, small_data, method="qlora", lora={"r": 4, "alpha": 8},
                     quantization={"unquantized_dtype": "bfloat16"})  # fmt: skip
    default, bf16 = (build_model(s, resolve_model(s.model)) for s in (spec, kept))
    for model, dtype in ((default, torch.float32), (bf16, torch.bfloat16)):
        embeddings = model.get_input_embeddings().weight
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        assert embeddings.dtype == dtype and {p.dtype for p in norms} == {dtype}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)  # the base stays frozen


TRACKER_ENV = ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
               "MLFLOW_TAGS", "HF_MLFLOW_LOG_ARTIFACTS", "MLFLOW_ALLOW_FILE_STORE", "WANDB_DIR",
               "WANDB_PROJECT", "WANDB_TAGS", "WANDB_LOG_MODEL", "WANDB_MODE")  # fmt: skip


@pytest.mark.slow
def test_a_run_reports_its_steps_to_tensorboard_mlflow_and_wandb_offline(
    local_ray, monkeypatch, tmp_path, tiny_llama, small_data
):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ftservice.train.driver import train

    for key in TRACKER_ENV:  # the recipe runs in this process (num_workers: 0): undo after
        monkeypatch.delenv(key, raising=False)
    spec = make_spec(
        tmp_path, tiny_llama, small_data,
        train={"report_to": ["tensorboard", "mlflow", "wandb"]}, scaling={"num_workers": 0},
        tracking={"tags": {"team": "search"}, "wandb_mode": "offline"},
    )  # fmt: skip
    result = train(spec, evaluate=False)
    steps = result.artifact.meta.metrics["global_step"]
    assert steps == 8

    [events] = {p.parent for p in (tmp_path / "runs").rglob("events.out.tfevents*")}
    assert events.name == "tensorboard" and events.parent.parent == tmp_path / "runs"
    board = EventAccumulator(str(events))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, steps + 1))

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.tags["team"] == "search" and run.data.tags["ftservice.job"] == "tiny"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, steps + 1))
    assert float(run.data.params["learning_rate"]) == spec.train.learning_rate

    # W&B offline: the run in the run's folder, ready for `wandb sync`, with every step
    [offline] = list((tmp_path / "runs").glob("*/wandb/offline-run-*"))
    [path] = list(offline.glob("run-*.wandb"))
    records = wandb_records(path)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "tiny" and set(run.tags) == {"ftservice.job=tiny", "team=search"}
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip
    logged = [h for h in history if "train/loss" in h]
    assert [h["train/global_step"] for h in logged] == list(range(1, steps + 1))
    assert [h["train/loss"] for h in logged] == pytest.approx([m.value for m in losses])


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: W&B's 7-byte header, then LevelDB's log
    framing (32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
