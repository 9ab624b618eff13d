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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from ftservice import storage
from ftservice.config import NAME_PATTERN, JobSpec
from ftservice.data.loaders import DataSource
from ftservice.errors import FtserviceError
from ftservice.models import BUILTIN_MODELS, load_causal_lm, resolve_model
from ftservice.records import HandoffError, Record, Strict

META = "ftservice.json"
LOSS_PLOT = "loss.png"
CARD = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ArtifactError(FtserviceError):
    """An artifact that is missing, incomplete, or does not fit where it is used."""


class BaseModelRef(Strict):
    name: str = Field(description="model.name as the spec said it.")
    fingerprint: str = Field(description="sha256 of the base's source weights and config.")
    kind: Literal["builtin", "gguf", "folder", "hub"]
    load_as: str | None = Field(
        None,
        description="How a user elsewhere loads the base (hub id, or the local folder): what "
        "adapter_config.json's base_model_name_or_path says. None in format version 1.",
    )
    path: str | None = Field(None, description="The resolved folder on the training machine.")


class SweepLineage(Strict):
    sweep: str
    trial: str
    metric: str
    value: float | None


class FeedbackLineage(Strict):
    """Where a loop's DPO adapter came from: the people's votes it was trained on."""

    loop: str
    campaign: str
    round: int
    votes: int = Field(description="Votes of the round the pairs were exported from.")
    pairs: int = Field(description="Preference pairs trained on.")
    pairs_fingerprint: str = Field(description="sha256 of the exported pairs file.")
    vote_ids: str = Field(description="File in the artifact listing the vote ids, one a line.")


class ArtifactMeta(Record):
    """`ftservice.json`: what an artifact is, where it came from, and how good it is."""

    format_version: int = 2
    name: str
    run_name: str
    spec: dict = Field(description="The resolved job spec the artifact was trained with.")
    base_model: BaseModelRef
    dataset_fingerprint: str = Field(
        description="Of the training data: the curated dataset's own when it is one curated "
        "dataset, else of the rows trained on."
    )
    data: list[DataSource] = Field(default_factory=list, description="Each training input.")
    metrics: dict
    parent: str | None = Field(None, description="The artifact this one was trained from.")
    created: str
    lineage: SweepLineage | None = Field(None, description="The sweep trial it was promoted from.")
    feedback: FeedbackLineage | None = Field(
        None, description="The loop round whose votes it was trained on."
    )

    @classmethod
    def upgrade(cls, data: dict, found) -> dict | None:
        # version 1 (stops 1-10) lacks data and base_model.load_as: both have defaults
        return data | {"format_version": 2} if found == 1 else None


@dataclass(frozen=True)
class Artifact:
    location: str
    """Where it lives: a local folder, or a folder of an object store (a URI)."""
    meta: ArtifactMeta

    @property
    def path(self) -> Path:
        """A local folder holding it: itself, or the cached copy of a stored one."""
        return storage.localize(self.location)

    @property
    def is_local(self) -> bool:
        return storage.local_path(self.location) is not None

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def method(self) -> str:
        return self.meta.spec["method"]

    @property
    def stage(self) -> str:
        return self.meta.spec["stage"]

    @property
    def is_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def base_fingerprint(self) -> str:
        return self.meta.base_model.fingerprint


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


def _free_name(registry: str, name: str) -> str:
    taken = set(storage.list_dirs(registry))
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


def _read_meta(location: str) -> ArtifactMeta:
    meta_file = storage.join(location, META)
    return ArtifactMeta.parse(json.loads(storage.read_text(meta_file)), meta_file)


def _is_artifact(location: str) -> bool:
    """A complete artifact: renamed in (local), or with its completion marker (a store)."""
    if not storage.is_file(storage.join(location, META)):
        return False
    return storage.local_path(location) is not None or storage.is_complete(location)


def list_artifacts(registry: str | Path) -> list[Artifact]:
    """Every complete artifact in a registry, by name. Folders being assembled (hidden
    temporary names, or uploads without their completion marker) are not artifacts."""
    registry = str(registry)
    found = []
    for name in storage.list_dirs(registry):
        location = storage.join(registry, name)
        if name.startswith(".") or not _is_artifact(location):
            continue
        try:
            found.append(Artifact(location, _read_meta(location)))
        except HandoffError as e:  # one unreadable artifact must not hide the others
            print(f"ftservice: skipping {location}: {e}", file=sys.stderr)
    return found


def find_published(registry: str | Path, run_name: str) -> Artifact | None:
    """The artifact a run already published (reruns of a finished run publish nothing new)."""
    return next((a for a in list_artifacts(registry) if a.meta.run_name == run_name), None)


def publish(
    registry: str | Path,
    name: str,
    weights: Path,
    *,
    spec: dict,
    run_name: str,
    base_model: BaseModelRef,
    dataset_fingerprint: str,
    data: list[DataSource],
    metrics: dict,
    log_history: list[dict],
    parent: str | None = None,
    feedback: FeedbackLineage | None = None,
    extra_files: dict[str, str] | None = None,
) -> Artifact:
    """Check the weights, assemble the artifact under a temporary name, then publish it in
    one step: a rename into a local registry, or an upload whose completion marker is
    written last into a store."""
    if not re.match(NAME_PATTERN, name):
        raise ArtifactError(f"artifact name '{name}' must match {NAME_PATTERN}")
    adapter = spec["method"] in ("lora", "qlora")
    check_weights(weights, adapter)
    pickles = sorted(p.name for p in weights.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ArtifactError(
            f"{weights}: holds pickle files ({', '.join(pickles)}); an artifact carries "
            "safetensors and JSON only, so nothing was published."
        )
    registry = str(registry)
    local = storage.local_path(registry)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=local))
    tmp.chmod(0o755)
    try:
        for item in weights.iterdir():
            target = tmp / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        final_name = _free_name(registry, name)
        meta = ArtifactMeta(
            name=final_name,
            run_name=run_name,
            spec=spec,
            base_model=base_model,
            dataset_fingerprint=dataset_fingerprint,
            data=data,
            metrics=_finite(metrics),
            parent=parent,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            feedback=feedback,
        )
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
        if adapter:
            _point_adapter_at_base(tmp, base_model.load_as)
        meta.write(tmp / META)
        (tmp / CARD).write_text(model_card(meta))
        (tmp / "log_history.json").write_text(json.dumps(log_history, indent=1, default=float))
        plot_loss(log_history, tmp / LOSS_PLOT, f"{final_name}: {spec['method']} {spec['stage']}")
        location = storage.join(registry, final_name)
        if local is not None:
            os.rename(tmp, local / final_name)
        else:
            storage.upload(tmp, location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Artifact(location, meta)


def _point_adapter_at_base(folder: Path, load_as: str | None) -> None:
    """adapter_config.json names the base as a user elsewhere loads it, not the trainer's
    cache folder (PEFT, vLLM and `AutoPeftModelForCausalLM` read it from there)."""
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = load_as
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
    """An artifact by location (folder or URI), or by name in the registry."""
    for location in (ref, storage.join(str(registry), ref)):
        if _is_artifact(location):
            return Artifact(location, _read_meta(location))
    raise ArtifactError(
        f"no artifact '{ref}': neither a folder with {META} nor a name in the registry "
        f"{registry}; `ftservice artifacts list {registry}` lists the artifacts there."
    )


def update_metrics(artifact: Artifact, metrics: dict) -> Artifact:
    """Add metrics (e.g. a later evaluation) to an artifact's ftservice.json and its model
    card, each replaced whole (atomically, locally)."""
    meta = artifact.meta.model_copy(
        update={"metrics": {**artifact.meta.metrics, **_finite(metrics)}}
    )
    storage.write_text(storage.join(artifact.location, META), meta.dumps())
    storage.write_text(storage.join(artifact.location, CARD), model_card(meta))
    return Artifact(artifact.location, meta)


# ---- the model card -----------------------------------------------------------------------


def _hyperparameters(spec: dict) -> list[tuple[str, object]]:
    t, d = spec["train"], spec["data"]
    rows: list[tuple[str, object]] = [("method", spec["method"]), ("stage", spec["stage"])]
    if spec["method"] in ("lora", "qlora"):
        lo = spec["lora"]
        targets = lo["target_modules"]
        rows += [
            ("LoRA rank r", lo["r"]),
            ("LoRA alpha", lo["alpha"]),
            ("LoRA dropout", lo["dropout"]),
            ("target modules", targets if isinstance(targets, str) else ", ".join(targets)),
            ("rsLoRA / DoRA", f"{lo['use_rslora']} / {lo['use_dora']}"),
        ]
    if spec["method"] == "qlora":
        q = spec["quantization"]
        rows.append(("4-bit base", f"{q['quant_type']}, double quant {q['double_quant']}"))
    if spec["stage"] == "dpo":
        rows += [("DPO beta", spec["dpo"]["beta"]), ("DPO loss", spec["dpo"]["loss_type"])]
    rows += [
        ("learning rate", t["learning_rate"]),
        ("schedule", f"{t['lr_scheduler']}, warm-up ratio {t['warmup_ratio']}"),
        ("epochs / max steps", f"{t['epochs']} / {t['max_steps']}"),
        (
            "micro batch × accumulation",
            f"{t['micro_batch_size']} × {t['gradient_accumulation_steps']}",
        ),
        ("workers", spec["scaling"]["num_workers"]),
        ("max sequence length", d["max_seq_length"]),
        ("packing", d["packing"]),
        ("precision", t["precision"]),
        ("seed", t["seed"]),
    ]
    return rows


def _evaluation_lines(evaluation: dict) -> list[str]:
    if not evaluation:
        return ["Not evaluated yet: `ftservice eval ARTIFACT` fills this in."]
    lines = ["| | base | tuned |", "| --- | ---: | ---: |"]
    if "domain" in evaluation:
        b, t = evaluation["domain_base"], evaluation["domain"]
        lines.append(
            f"| held-out domain score | {b['accuracy']:.1%} ({b['correct']} of {b['total']}) "
            f"| {t['accuracy']:.1%} ({t['correct']} of {t['total']}) |"
        )
        lines.append(f"| domain answer loss | {b['loss']:.3f} | {t['loss']:.3f} |")
    if "forgetting" in evaluation:
        f = evaluation["forgetting"]
        lines.append(
            f"| KL(base‖tuned) on {f['prompts']} general prompts, nats/token "
            f"| {f['kl_base_from_itself']:.4f} | {f['kl_from_base']:.4f} |"
        )
        lines.append(
            f"| perplexity of the base's answers | {f['perplexity_base']:.2f} "
            f"| {f['perplexity_tuned']:.2f} |"
        )
    return lines


def model_card(meta: ArtifactMeta) -> str:
    """README.md of an artifact: a Hugging Face model card with what a user needs to trust
    and load it."""
    spec, base = meta.spec, meta.base_model
    adapter = spec["method"] in ("lora", "qlora")
    load_as = base.load_as or base.name
    front = [
        "---",
        f"base_model: {load_as}" if base.kind in ("builtin", "hub") else None,
        f"library_name: {'peft' if adapter else 'transformers'}",
        "pipeline_tag: text-generation",
        f"tags: [ftservice, {spec['method']}, {spec['stage']}]",
        "---",
    ]
    if base.kind == "builtin":
        gguf = BUILTIN_MODELS[base.name].gguf_file
        about_base = (
            f"`{load_as}` (ftservice's built-in `{base.name}`). The weights trained on are "
            f"dequantized from the GGUF `{gguf}` (fingerprint `{base.fingerprint[:16]}`), so "
            "they differ slightly from the hub's: for exact results load the base through "
            f"ftservice (`model.name: {base.name}`)."
        )
    else:
        about_base = f"`{load_as}` ({base.kind}, fingerprint `{base.fingerprint[:16]}`)."
    what = f"A {spec['method'].upper()} adapter" if adapter else "Fully fine-tuned weights"
    lines = [
        *(x for x in front if x is not None),
        "",
        f"# {meta.name}",
        "",
        f"{what} ({spec['stage'].upper()}) trained by ftservice on {meta.created}"
        + (f", from the artifact `{meta.parent}`." if meta.parent else "."),
        "",
        "## Base model",
        "",
        about_base,
        "",
        "## Training",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in _hyperparameters(spec)),
        "",
        "## Data",
        "",
        f"Dataset fingerprint `{meta.dataset_fingerprint}`.",
        "",
        *(f"- `{d.path}` ({d.kind}, fingerprint `{d.fingerprint[:16]}`)" for d in meta.data),
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(meta.metrics.get("evaluation") or {}),
        "",
        "## Use",
        "",
        "```python",
    ]
    if adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            "# the base named in adapter_config.json is loaded, then this adapter on it",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{meta.name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{meta.name}")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{meta.name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{meta.name}")',
        ]
    lines += ["```", ""]
    if adapter:
        lines += [
            "Serve it beside other adapters on one base with vLLM: "
            f"`vllm serve {load_as} --enable-lora --max-lora-rank {spec['lora']['r']} "
            f"--lora-modules {meta.name}=./{meta.name}`, or merge it into plain weights with "
            f"`ftservice export {meta.name} --merge OUT`.",
            "",
        ]
    return "\n".join(lines)


# ---- the registry -------------------------------------------------------------------------


def key_metric(artifact: Artifact) -> str:
    """The one number that says how good an artifact is, by what it is."""
    m = artifact.meta.metrics
    domain = (m.get("evaluation") or {}).get("domain")
    if domain:
        return f"domain score {domain['accuracy']:.1%}"
    last = (m.get("preference") or {}).get("last")
    if last and "rewards/accuracies" in last:
        return f"reward accuracy {last['rewards/accuracies']:.2f}"
    if artifact.meta.lineage and artifact.meta.lineage.value is not None:
        return f"{artifact.meta.lineage.metric} {artifact.meta.lineage.value:.4f}"
    if m.get("best_eval_loss") is not None:
        return f"eval loss {m['best_eval_loss']:.4f}"
    if m.get("last_loss") is not None:
        return f"train loss {m['last_loss']:.4f}"
    return "-"


def lineage(artifact: Artifact, registry: str | Path) -> list[Artifact]:
    """The chain of artifacts from the first one trained on the base to `artifact`."""
    chain = [artifact]
    seen = {artifact.meta.run_name}
    while chain[-1].meta.parent is not None:
        parent = load_artifact(chain[-1].meta.parent, registry)
        if parent.meta.run_name in seen:
            raise ArtifactError(f"{parent.location}: the lineage of {artifact.name} is a cycle")
        seen.add(parent.meta.run_name)
        chain.append(parent)
    return chain[::-1]


def children(name: str, registry: str | Path) -> list[Artifact]:
    return [a for a in list_artifacts(registry) if a.meta.parent == name]


def remove(name: str, registry: str | Path, force: bool = False) -> str:
    """Delete an artifact from its registry; refused while another names it as its parent."""
    registry = str(registry)
    location = storage.join(registry, name)
    if not _is_artifact(location):
        raise ArtifactError(
            f"no artifact '{name}' in the registry {registry}; "
            f"`ftservice artifacts list {registry}` lists the artifacts there."
        )
    kids = children(name, registry)
    if kids and not force:
        raise ArtifactError(
            f"{name} is the parent of {', '.join(k.name for k in kids)}; removing it "
            "would break their lineage. Remove those first, or pass --force."
        )
    local = storage.local_path(location)
    if local is None:
        storage.delete(location)
    else:
        # rename away first, so a reader never sees a half-deleted artifact
        doomed = local.with_name(f".{name}.removing")
        os.rename(local, doomed)
        shutil.rmtree(doomed)
    return location


def export_merged(artifact: Artifact, out: str | Path) -> Path:
    """The adapter merged into its base, saved as plain safetensors with the tokenizer."""
    from transformers import AutoTokenizer

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

    spec = JobSpec.model_validate(artifact.meta.spec)
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
