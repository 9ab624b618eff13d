"""Registries, runs and data on storage URIs: `file://` and a local S3-compatible server
(moto's, on 127.0.0.1), through real Ray workers; publish stays all-or-nothing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from ftservice import storage
from ftservice.artifacts import (
    META,
    ArtifactError,
    BaseModelRef,
    list_artifacts,
    load_artifact,
    publish,
    remove,
)
from ftservice.config import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
BUCKET = "ftservice-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free local port; the AWS variables that pyarrow (and so Ray
    Train's storage) read point at it. Set before the module's Ray starts, so its workers
    inherit them."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield f"s3://{BUCKET}"
        finally:
            server.stop()


def adapter_weights(folder: Path, tiny_llama: Path, seed: int) -> Path:
    """An adapter folder as training leaves it, made by writing weights (no training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return folder


SPEC = spec_from_dict({"name": "tiny", "model": {"name": "tiny"}}).model_dump(mode="json")


def publish_one(registry: str, name: str, weights: Path, parent: str | None = None):
    base = BaseModelRef(name="tiny", fingerprint="0" * 64, kind="folder", load_as="/m")
    return publish(
        registry, name, weights, spec=SPEC, run_name=f"run-{name}", base_model=base,
        dataset_fingerprint="f" * 64, data=[], metrics={}, log_history=[], parent=parent,
    )  # fmt: skip


def round_trip(registry: str, tmp_path: Path, tiny_llama: Path) -> None:
    weights = adapter_weights(tmp_path / "w", tiny_llama, seed=0)
    first = publish_one(registry, "sft", weights)
    second = publish_one(registry, "dpo", weights, parent="sft")
    again = publish_one(registry, "sft", weights)  # the name is taken: a free one is chosen
    assert (first.name, second.name, again.name) == ("sft", "dpo", "sft-2")
    assert [a.name for a in list_artifacts(registry)] == ["dpo", "sft", "sft-2"]
    loaded = load_artifact("dpo", registry)
    assert loaded.location == storage.join(registry, "dpo")
    assert loaded.meta == second.meta and loaded.meta.parent == "sft"
    original = load_file(weights / "adapter_model.safetensors")
    copied = load_file(loaded.path / "adapter_model.safetensors")
    assert all(torch.equal(original[k], copied[k]) for k in original)
    config = json.loads((loaded.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/m"
    with pytest.raises(ArtifactError, match="is the parent of dpo"):
        remove("sft", registry)
    remove("sft-2", registry)
    assert [a.name for a in list_artifacts(registry)] == ["dpo", "sft"]


@pytest.mark.slow
def test_publish_and_load_round_trip_on_a_file_uri(tmp_path, tiny_llama):
    registry = (tmp_path / "registry").as_uri()
    assert registry.startswith("file:///")
    round_trip(registry, tmp_path, tiny_llama)
    assert sorted(p.name for p in (tmp_path / "registry").iterdir()) == ["dpo", "sft"]


@pytest.mark.slow
def test_publish_and_load_round_trip_on_s3_and_partial_uploads_are_ignored(
    s3, tmp_path, tiny_llama
):
    registry = f"{s3}/round-trip"
    round_trip(registry, tmp_path, tiny_llama)
    fs, root = pafs.FileSystem.from_uri(registry)
    assert fs.get_file_info(f"{root}/sft/{storage.COMPLETE}").type == pafs.FileType.File
    assert fs.get_file_info(f"{root}/sft-2").type == pafs.FileType.NotFound
    # an upload cut short (every file but its completion marker) is not an artifact
    weights = adapter_weights(tmp_path / "w2", tiny_llama, seed=1)
    pafs.copy_files(str(weights), f"{root}/half", destination_filesystem=fs)
    with fs.open_output_stream(f"{root}/half/{META}") as f:
        f.write(json.dumps(load_artifact("sft", registry).meta.model_dump()).encode())
    assert [a.name for a in list_artifacts(registry)] == ["dpo", "sft"]
    with pytest.raises(ArtifactError, match="no artifact 'half'"):
        load_artifact("half", registry)


@pytest.mark.slow
def test_training_reads_data_from_s3_and_publishes_there_through_ray_workers(
    s3, local_ray, tmp_path, tiny_llama
):
    from ftservice.serve.finetune import (
        HISTORY_FILE,
        checkpoint_states,
        logged_steps,
        publish_checkpoints,
    )
    from ftservice.train.driver import drop_checkpoints, run_name, train

    fs, root = pafs.FileSystem.from_uri(f"{s3}/project")
    lines = (REPO / "data/domain/train.jsonl").read_text().splitlines()[:16]
    with fs.open_output_stream(f"{root}/data/train.jsonl") as f:
        f.write(("\n".join(lines) + "\n").encode())
    general = (REPO / "data/general/prompts.jsonl").read_text().splitlines()[:2]
    with fs.open_output_stream(f"{root}/data/general.jsonl") as f:
        f.write(("\n".join(general) + "\n").encode())
    spec = spec_from_dict(
        {
            "name": "on-s3",
            "model": {"name": str(tiny_llama)},
            "data": {"train": [f"{s3}/project/data/train.jsonl"], "max_seq_length": 96},
            "lora": {"r": 4, "alpha": 8},
            "train": {
                "learning_rate": 5e-3,
                "micro_batch_size": 8,
                "max_steps": 4,
                "warmup_ratio": 0,
            },
            "checkpoint": {"every_steps": 2, "num_to_keep": 2},
            "eval": {
                "domain": None,
                "general": f"{s3}/project/data/general.jsonl",
                "max_new_tokens": 4,
            },
            "output": {
                "registry": f"{s3}/project/registry",
                "storage_path": f"{s3}/project/runs",
                "keep_checkpoints": True,
            },
        },
        check_inputs=True,
    )
    result = train(spec)
    artifact = result.artifact
    assert artifact.location == f"{s3}/project/registry/on-s3"
    assert result.evaluation["forgetting"]["prompts"] == 2  # the eval task read S3 too
    stored = load_artifact("on-s3", spec.output.registry)
    assert stored.meta.metrics["global_step"] == 4
    assert stored.meta.metrics["evaluation"] == result.evaluation  # written back to S3
    assert [d.path for d in stored.meta.data] == spec.data.train
    assert stored.meta.metrics["last_loss"] < stored.meta.metrics["first_loss"]
    # what the jobs API reads of a run kept in the bucket: its logged steps (uploaded as
    # the run went on), its kept checkpoints, each published as a model of its own
    run = f"{s3}/project/runs/{run_name(spec)}"
    history = json.loads(storage.read_text(f"{artifact.location}/{HISTORY_FILE}"))
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert {e["step"]: e["loss"] for e in logged_steps(run) if "loss" in e} == losses
    assert [c.state["global_step"] for c in checkpoint_states(run)] == [2, 4]
    assert publish_checkpoints(stored, history, run) == ["on-s3-step-2"]
    step2 = load_artifact("on-s3-step-2", spec.output.registry)
    kept = checkpoint_states(run)[0].folder
    published = load_file(step2.path / "adapter_model.safetensors")
    saved = load_file(storage.cached(f"{kept}/adapter_model.safetensors"))
    assert published.keys() == saved.keys()
    assert all(torch.equal(published[k], saved[k]) for k in saved)
    assert step2.meta.metrics == {"global_step": 2, "checkpoint_of": "on-s3"}
    # Ray Train kept its run in the bucket; dropping its checkpoints leaves none
    drop_checkpoints(run)
    runs = fs.get_file_info(pafs.FileSelector(f"{root}/runs", recursive=True))
    assert any(i.base_name == "checkpoint_manager_snapshot.json" for i in runs)
    assert not any("/checkpoint_" in i.path and i.type == pafs.FileType.Directory for i in runs)
    assert not any("/staging" in i.path for i in runs)  # the hand-off folder was cleared
    assert not (Path(os.getcwd()) / "s3:").exists()  # no local folder named after the scheme
    # the same spec again finds the published artifact in the bucket
    assert train(spec, evaluate=False).artifact.location == artifact.location


def test_a_checkpoint_counts_once_ray_train_holds_it(tmp_path):
    """A worker writes a checkpoint's folder before reporting it: until Ray Train's snapshot
    names it, a paused run cannot resume from it, so it is not listed (and a finished run
    drops it)."""
    from ftservice.serve.finetune import checkpoint_states
    from ftservice.train.driver import CHECKPOINT_SNAPSHOT, drop_stray_checkpoints

    run = tmp_path / "run"
    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 4)):
        (run / name / "checkpoint").mkdir(parents=True)
        (run / name / "checkpoint" / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "log_history": []})
        )
    assert checkpoint_states(str(run)) == []  # no snapshot yet: Ray holds none
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a", "metrics": {}}]}
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps(snapshot))
    assert [c.state["global_step"] for c in checkpoint_states(str(run))] == [2]
    assert drop_stray_checkpoints(str(run)) == ["checkpoint_b"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_a", CHECKPOINT_SNAPSHOT]
