"""The artifact contract and the registry.

An artifact is a folder: adapter weights (or full weights) as safetensors, adapter_config.json
(adapters), the tokenizer with its chat template, `ftservice.json` (spec, base-model and
dataset fingerprints, metrics, parent, created) and `loss.png`. It is assembled under a
temporary name and renamed into the registry only when complete and checked, so a registry
never holds a partial or empty artifact.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ftservice.config import NAME_PATTERN
from ftservice.errors import FtserviceError

META = "ftservice.json"
LOSS_PLOT = "loss.png"
FORMAT_VERSION = 1


class ArtifactError(FtserviceError):
    """An artifact that is missing, incomplete, or does not fit where it is used."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def method(self) -> str:
        return self.meta["spec"]["method"]

    @property
    def is_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def base_fingerprint(self) -> str:
        return self.meta["base_model"]["fingerprint"]


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def check_weights(folder: Path, adapter: bool) -> int:
    """Refuse empty, partial or broken weights; returns the number of tensors checked."""
    import torch
    from safetensors import safe_open

    if adapter and not (folder / "adapter_config.json").is_file():
        raise ArtifactError(f"{folder}: adapter_config.json is missing; the run did not finish.")
    files = weight_files(folder)
    if adapter:
        files = [f for f in files if f.name.startswith("adapter_model")]
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded full weights: every shard the index names must be there
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ArtifactError(f"{folder}: weight shards missing: {', '.join(missing)}")
    if not files:
        raise ArtifactError(
            f"{folder}: no safetensors weights; refusing to publish an empty artifact."
        )
    tensors = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                t = st.get_tensor(key)
                if t.numel() == 0:
                    raise ArtifactError(f"{f}: tensor {key} is empty; refusing to publish.")
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ArtifactError(f"{f}: tensor {key} has NaN or infinite values.")
                tensors += 1
    if tensors == 0:
        raise ArtifactError(f"{folder}: weights hold no tensors; refusing to publish.")
    return tensors


def plot_loss(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#3b7dd8")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#d8843b")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _free_name(registry: Path, name: str) -> str:
    if not (registry / name).exists():
        return name
    n = 2
    while (registry / f"{name}-{n}").exists():
        n += 1
    return f"{name}-{n}"


def find_published(registry: Path, run_name: str) -> Artifact | None:
    """The artifact a run already published (reruns of a finished run publish nothing new)."""
    if not registry.is_dir():
        return None
    for folder in sorted(registry.iterdir()):
        meta_file = folder / META
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            if meta.get("run_name") == run_name:
                return Artifact(folder, meta)
    return None


def publish(
    registry: Path,
    name: str,
    weights: Path,
    *,
    spec: dict,
    run_name: str,
    base_model: dict,
    dataset_fingerprint: str,
    metrics: dict,
    log_history: list[dict],
    parent: str | None = None,
) -> Artifact:
    """Check the weights, assemble the artifact under a temporary name, rename it in."""
    if not re.match(NAME_PATTERN, name):
        raise ArtifactError(f"artifact name '{name}' must match {NAME_PATTERN}")
    adapter = spec["method"] in ("lora", "qlora")
    check_weights(weights, adapter)
    registry.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=registry))
    tmp.chmod(0o755)
    try:
        for item in weights.iterdir():
            target = tmp / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        final_name = _free_name(registry, name)
        meta = {
            "format_version": FORMAT_VERSION,
            "name": final_name,
            "run_name": run_name,
            "spec": spec,
            "base_model": base_model,
            "dataset_fingerprint": dataset_fingerprint,
            "metrics": _finite(metrics),
            "parent": parent,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "log_history.json").write_text(json.dumps(log_history, indent=1, default=float))
        plot_loss(log_history, tmp / LOSS_PLOT, f"{final_name}: {spec['method']} {spec['stage']}")
        os.rename(tmp, registry / final_name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(registry / final_name, meta)


def _finite(metrics: dict) -> dict:
    """JSON has no NaN: keep them visible as strings rather than writing invalid JSON."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[k] = _finite(v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)
        else:
            out[k] = v
    return out


def load_artifact(ref: str, registry: str | Path = "artifacts") -> Artifact:
    """An artifact by path, or by name in the registry."""
    path = Path(ref)
    if not (path / META).is_file():
        path = Path(registry) / ref
    if not (path / META).is_file():
        raise ArtifactError(
            f"no artifact '{ref}': neither a folder with {META} nor a name in the registry "
            f"{registry}; `ls {registry}` lists the artifacts there."
        )
    return Artifact(path, json.loads((path / META).read_text()))


def update_metrics(artifact: Artifact, metrics: dict) -> Artifact:
    """Add metrics (e.g. a later evaluation) to an artifact's ftservice.json, atomically."""
    meta = dict(artifact.meta)
    meta["metrics"] = {**meta.get("metrics", {}), **_finite(metrics)}
    tmp = artifact.path / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, artifact.path / META)
    return Artifact(artifact.path, meta)


def export_merged(artifact: Artifact, out: str | Path) -> Path:
    """The adapter merged into its base, saved as plain safetensors with the tokenizer."""
    from transformers import AutoTokenizer

    from ftservice.config import JobSpec
    from ftservice.models import load_causal_lm, resolve_model

    out = Path(out)
    if out.exists():
        raise ArtifactError(f"{out} exists; choose a new folder for the merged weights.")
    if not artifact.is_adapter:
        raise ArtifactError(
            f"{artifact.name} holds full weights ({artifact.method}); load it directly, "
            "there is no adapter to merge."
        )
    import torch
    from peft import PeftModel

    spec = JobSpec.model_validate(artifact.meta["spec"])
    base = load_causal_lm(resolve_model(spec.model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, artifact.path).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(artifact.path).save_pretrained(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
