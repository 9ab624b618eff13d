"""Typed job specs: what one fine-tuning run is, loaded from YAML and checked before anything runs.

Every model forbids unknown keys, every field carries a one-line description (shown by
`ftservice validate` and `ftservice schema`), and every error names the file, the field path
and the YAML line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftservice import storage
from ftservice.errors import FtserviceError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
S = TypeVar("S", bound=BaseModel)


class Spec(BaseModel):
    """Base of every spec section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Spec):
    name: str = Field(
        description="Base model (required): a built-in alias, a local Hugging Face folder, a "
        ".gguf file, or a hub id (org/name).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model (only for models you trust)."
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Accept .bin/.pt weights (pickle can run code); safetensors only otherwise.",
    )


class NearDedupSpec(Spec):
    enabled: bool = Field(True, description="Remove near-duplicates (MinHash LSH).")
    threshold: float = Field(
        0.85, gt=0, lt=1, description="Estimated Jaccard similarity above which two are near-dups."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    shingle_size: int = Field(5, ge=1, description="Characters per shingle of the text.")


class DecontaminateSpec(Spec):
    enabled: bool = Field(
        True, description="Drop training examples sharing an n-gram with eval or benchmark sets."
    )
    n: int = Field(13, ge=3, description="Words per n-gram.")
    benchmarks: list[str] = Field(
        default_factory=list, description="Extra benchmark files to decontaminate against."
    )


class LengthSpec(Spec):
    min_tokens: int = Field(1, ge=0, description="Drop examples shorter than this (tokens).")
    max_tokens: int | None = Field(
        None, ge=1, description="Longest example in tokens; unset: data.max_seq_length."
    )
    mode: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with longer examples: drop, or cut the final response."
    )


class CurateSpec(Spec):
    normalize_unicode: bool = Field(True, description="NFKC, strip control chars, tidy spaces.")
    drop_empty: bool = Field(True, description="Drop examples whose response is empty.")
    pii: bool = Field(
        False, description="Replace emails, phone numbers, IPs and API-key-like strings."
    )
    exact_dedup: bool = Field(True, description="Drop exact duplicates (after normalisation).")
    near_dedup: NearDedupSpec = Field(
        default_factory=NearDedupSpec, description="Near-duplicate removal."
    )
    decontaminate: DecontaminateSpec = Field(
        default_factory=DecontaminateSpec, description="Eval and benchmark leak removal."
    )
    length: LengthSpec = Field(default_factory=LengthSpec, description="Length filter in tokens.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of examples split off (by content hash) for eval."
    )
    split_seed: int = Field(0, description="Seed of the hash-based train/eval split.")
    output_dir: str | None = Field(
        None, description="Where curated data and the report go; unset: curated/<name>."
    )
    output_format: Literal["parquet", "jsonl"] = Field(
        "parquet", description="File format of the curated data."
    )
    batch_rows: int = Field(
        2048, ge=1, description="Rows per block: memory is bounded by this, not the files."
    )


class ReplaySpec(Spec):
    prompts: str = Field(
        "data/general/replay.jsonl",
        description="General prompts the base model answers once; its answers are mixed into "
        "training so the tuned model keeps answering as the base did.",
    )
    ratio: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of the training examples that are replay examples (DPO: of the "
        "examples each step sees, beside its preference pairs).",
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest base answer to a replay prompt.")
    cache: str | None = Field(
        None,
        description="Folder (or URI) of the cached base answers, one file per fingerprint of "
        "base model, prompts and settings; default: <output.storage_path>/replay.",
    )


class DataSpec(Spec):
    train: list[str] = Field(
        default_factory=lambda: ["data/domain/train.jsonl"],
        min_length=1,
        description="Training files or folders (JSONL, JSON, CSV, Parquet, datasets folders).",
    )
    eval: list[str] = Field(
        default_factory=list, description="Held-out files for the eval loss during training."
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Only the first N held-out examples (quicker evaluations)."
    )
    format: Literal[
        "auto", "alpaca", "sharegpt", "openai", "text", "preference", "openai_dpo", "kto"
    ] = Field("auto", description="Record format; 'auto' recognises it from the fields.")
    system_prompt: str | None = Field(
        None, description="System turn added to every conversation that has none."
    )
    max_seq_length: int = Field(
        512, ge=16, description="Longest tokenised example; longer ones are dropped or cut."
    )
    completion_only_loss: bool = Field(
        True, description="Compute the loss on assistant tokens only (prompt tokens masked)."
    )
    packing: bool = Field(
        False, description="Pack several examples into one sequence (block-diagonal attention)."
    )
    curate: CurateSpec = Field(
        default_factory=CurateSpec, description="Curation steps of `ftservice data curate`."
    )
    replay: ReplaySpec | None = Field(
        None,
        description="Replay of the base model's own answers to general prompts, against "
        "forgetting (SFT; DPO with train.kl_to_base).",
    )


class LoraSpec(Spec):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' or a list of names."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")


class QuantSpec(Spec):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base.")
    double_quant: bool = Field(
        True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit weights are dequantised to for matmuls."
    )
    unquantized_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Dtype of the weights left unquantised (embeddings, norms, LM head): "
        "float32 as PEFT's k-bit preparation casts them, or bfloat16 (half their memory; "
        "GiBs for a 128k vocabulary).",
    )


class TrainSpec(Spec):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training set.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    micro_batch_size: int = Field(4, ge=1, description="Examples per worker per forward pass.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches summed before each optimizer step."
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps for warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for weights init, dropout and data order.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision; 'auto' picks bf16 where the hardware has it."
    )
    attention: Literal["auto", "documents", "sdpa"] = Field(
        "auto",
        description="Attention of packed rows (SFT): 'documents' attends within each packed "
        "example as one batched matmul; 'sdpa' is transformers' SDPA under a block-diagonal "
        "mask; 'auto' is documents when data.packing is on.",
    )
    label_only_head: bool = Field(
        True,
        description="SFT with adapters: run the LM head only on tokens that have a label, in "
        "the training dtype, with its input gradient made in the same pass (TRL's head "
        "otherwise, and always when the head is trained).",
    )
    kl_to_base: float = Field(
        0.0,
        ge=0,
        description="SFT or DPO with adapters and data.replay: weight of KL(base || tuned) on "
        "the replay answers' tokens, added to the loss; the base is the same model with every "
        "adapter disabled (the original base, not a DPO parent), its states computed once "
        "before training. Replay examples then teach through this term alone (no "
        "cross-entropy, no pairs). 0: off (SFT: replay examples are plain SFT data; DPO "
        "refuses data.replay then).",
    )
    logging_steps: int = Field(1, ge=1, description="Report metrics every this many steps.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers rank 0 writes to (the HF Trainer's integrations): "
        "tensorboard (event files in the run's folder), mlflow (tracking.uri), wandb (W&B; "
        "tracking.wandb_mode).",
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="AdamW (torch's), or bitsandbytes' 8-bit AdamW, optionally paged (GPUs "
        "only): a quarter of AdamW's state memory.",
    )


class DpoSpec(Spec):
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty to the reference.")
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
    ] = Field("sigmoid", description="TRL's DPO loss type (its DPOConfig.loss_type).")  # fmt: skip
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed fraction of flipped preference labels."
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of an SFT term on the chosen answers added to the DPO loss (RPO, "
        "Pang et al. 2024; TRL's loss_type 'sft'): keeps the likelihood of what was chosen "
        "from falling, and with it what the parent knew. 0: plain DPO.",
    )
    parent: str | None = Field(
        None, description="SFT artifact (path or registry name) to start from; base if unset."
    )


class DeepSpeedSpec(Spec):
    stage: Literal[0, 1, 2, 3] = Field(
        3, description="ZeRO stage: 3 partitions parameters, gradients and optimizer states."
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where optimizer states live."
    )
    offload_params: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where parameters live between uses (ZeRO-3 only)."
    )
    nvme_path: str | None = Field(None, description="Local NVMe folder for nvme offload.")


class ScalingSpec(Spec):
    num_workers: int = Field(
        1,
        ge=0,
        description="Ray Train workers (data-parallel ranks); 0 runs the recipe in the driver "
        "process (Ray Train's local mode: for debugging, no restarts).",
    )
    use_gpu: bool = Field(False, description="Give each worker GPUs.")
    gpus_per_worker: float = Field(1, gt=0, description="GPUs per worker when use_gpu is on.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    threads_per_worker: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of a CPU worker (torch), default: its cpus_per_worker. "
        "Above that only where the other reserved CPUs idle while it trains (the loop's DPO "
        "beside an app that is not generating).",
    )
    deepspeed: DeepSpeedSpec | None = Field(
        None,
        description="DeepSpeed ZeRO settings for method full; unset is ZeRO-3 without offload.",
    )


class ClusterSpec(Spec):
    """The largest shape the target cluster can ever take; checked against `scaling`.

    Without a `cluster` section the target is this machine (the embedded local Ray).
    """

    max_nodes: int = Field(1, ge=1, description="Most worker nodes the cluster can scale to.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs on each node.")
    cpus_per_node: int | None = Field(
        None, ge=1, description="CPUs on each node; unchecked if unset."
    )
    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory of one GPU, in GB.")
    memory_gb: float | None = Field(
        None, gt=0, description="CPU RAM of each node, in GB (for offload and CPU workers)."
    )


class CheckpointSpec(Spec):
    every_steps: int = Field(50, ge=1, description="Save (and report to Ray) every N steps.")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints Ray keeps; older ones deleted.")
    score_attribute: str = Field("eval_loss", description="Metric that ranks checkpoints.")
    score_order: Literal["min", "max"] = Field("min", description="Better checkpoints are ...")
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts on failure (-1: unlimited)."
    )


class EvalSpec(Spec):
    domain: str | None = Field(
        "data/domain/eval.jsonl", description="Held-out domain questions with reference answers."
    )
    general: str | None = Field(
        "data/general/prompts.jsonl", description="Everyday prompts for measuring forgetting."
    )
    every_steps: int | None = Field(
        None, ge=1, description="Eval loss every N steps (needs data.eval); end only if unset."
    )
    max_new_tokens: int = Field(48, ge=1, description="Generation length for the domain score.")
    allow_selection_on_domain: bool = Field(
        False,
        description="Allow data.eval (what checkpoints and sweeps are selected on) to be the "
        "held-out domain set itself; the domain score is then no longer held out.",
    )


class OutputSpec(Spec):
    registry: str = Field(
        "artifacts", description="Registry for artifacts: a folder or a URI (file://, s3://...)."
    )
    storage_path: str = Field(
        "runs", description="Ray Train storage for runs and checkpoints (folder or URI)."
    )
    keep_checkpoints: bool = Field(
        True,
        description="Keep a run's Train checkpoints once its artifact is published (false: "
        "delete them; the artifact holds the final weights).",
    )


class RuntimeSpec(Spec):
    pip: list[str] = Field(
        default_factory=list, description="Extra pip requirements for cluster jobs."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set for the job's processes."
    )


class TrackingSpec(Spec):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://..., sqlite:///..., file:///...); default: "
        "a file store, mlruns/ in output.storage_path.",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; default: the job's name (a sweep's: its name)."
    )
    tags: dict[str, str] = Field(
        default_factory=dict, description="Tags of the run (a sweep adds its name and trial)."
    )
    wandb_mode: Literal["online", "offline"] | None = Field(
        None,
        description="W&B's mode: offline writes the run into the run's folder (`wandb sync` "
        "uploads it later); default: W&B's own settings (WANDB_MODE, `wandb login`).",
    )


class JobSpec(Spec):
    """One fine-tuning run: what to train, on what data, how, where, and where it goes."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)] = Field(
        "quickstart", description="Run and artifact name: [a-z0-9][a-z0-9._-]*."
    )
    stage: Literal["sft", "dpo"] = Field("sft", description="Supervised (sft) or preference (dpo).")
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="Adapters on a frozen base, on a 4-bit base, or every parameter."
    )
    model: ModelSpec = Field(description="The base model (required: no default is assumed).")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape (lora, qlora).")
    quantization: QuantSpec = Field(
        default_factory=QuantSpec, description="4-bit base settings (qlora)."
    )
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="Preference training (stage dpo).")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Ray Train workers.")
    cluster: ClusterSpec = Field(
        default_factory=ClusterSpec, description="Largest shape of the target cluster."
    )
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="Checkpoints and failure handling."
    )
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation after training.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Where train.report_to's MLflow and W&B runs go, and their tags.",
    )
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec, description="Runtime environment of cluster jobs."
    )


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, located as precisely as we can."""

    path: str
    message: str
    line: int | None = None
    override: str | None = None
    """The command-line override the bad value came from, if any."""

    def render(self, source: str) -> str:
        if self.override is not None:
            where = f"command-line override '{self.override}'"
        else:
            where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path or '(top level)'}: {self.message}"


class SpecError(FtserviceError):
    """A spec that cannot be used; carries every problem found, each with its location."""

    exit_code = 2

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = [p.render(source) for p in problems]
        if len(lines) > 1:
            lines.insert(0, f"{len(lines)} problems in {source}:")
        super().__init__("\n".join(lines))


def cross_field_problems(spec: JobSpec) -> list[Problem]:
    """Checks between fields that a single field's type cannot express; returns all of them."""
    problems: list[Problem] = []
    ds = spec.scaling.deepspeed
    # Sections equal to their defaults are harmless (a resolved spec, dumped, holds them all).
    if spec.method == "full" and spec.lora != LoraSpec():
        problems.append(
            Problem(
                "lora",
                "LoRA settings are given but method is 'full', which trains every parameter "
                "and ignores them; remove the lora section or set method: lora.",
            )
        )
    if spec.method != "qlora" and spec.quantization != QuantSpec():
        problems.append(
            Problem(
                "quantization",
                f"4-bit settings are given but method is '{spec.method}'; "
                "remove the quantization section or set method: qlora.",
            )
        )
    if spec.method != "full" and ds is not None and not (spec.method == "qlora" and ds.stage == 3):
        problems.append(
            Problem(
                "scaling.deepspeed",
                f"DeepSpeed settings are given but method is '{spec.method}': adapters train on "
                "one device per worker (data parallel), and training ignores this section; "
                "remove the scaling.deepspeed section, or set method: full.",
            )
        )
    if spec.stage == "dpo" and spec.data.packing:
        problems.append(
            Problem(
                "data.packing",
                "packing is given but stage is 'dpo': preference pairs are never packed "
                "(chosen and rejected are scored as whole sequences), so training ignores it; "
                "remove data.packing.",
            )
        )
    if spec.stage == "dpo" and not spec.data.completion_only_loss:
        problems.append(
            Problem(
                "data.completion_only_loss",
                "completion_only_loss: false is given but stage is 'dpo': DPO scores the "
                "answers only, whatever this says, so training ignores it; remove "
                "data.completion_only_loss.",
            )
        )
    if spec.train.attention == "documents" and not spec.data.packing:
        problems.append(
            Problem(
                "train.attention",
                "documents attention is for packed rows, and data.packing is off (each row "
                "holds one example, which SDPA's causal kernel already attends alone); set "
                "data.packing: true, or train.attention: auto.",
            )
        )
    if spec.data.replay is not None and spec.stage == "dpo" and spec.train.kl_to_base == 0:
        problems.append(
            Problem(
                "data.replay",
                "replay examples are the base's answers, not preference pairs, so where "
                "stage is 'dpo' they teach through the KL term alone, and train.kl_to_base is "
                "0; set train.kl_to_base (e.g. 1.0), or remove data.replay (or replay in the "
                "SFT run this one starts from).",
            )
        )
    if spec.train.kl_to_base > 0:
        if spec.method not in ("lora", "qlora"):
            problems.append(
                Problem(
                    "train.kl_to_base",
                    f"the KL term's base is the adapter-disabled model, and this is "
                    f"{spec.method} {spec.stage}; use it with method: lora or qlora, or set "
                    "train.kl_to_base: 0.",
                )
            )
        if spec.data.replay is None:
            problems.append(
                Problem(
                    "train.kl_to_base",
                    "the KL term is taken on replay tokens and data.replay is not set; add "
                    "data.replay: {ratio: 0.2}, or set train.kl_to_base: 0.",
                )
            )
    if spec.train.warmup_ratio >= 1:
        problems.append(
            Problem(
                "train.warmup_ratio",
                f"{spec.train.warmup_ratio} is read by transformers as a step count (values "
                "of 1 or more are steps, not a share), so warm-up would last that many steps; "
                "give a share of the steps below 1 (e.g. 0.05).",
            )
        )
    if spec.train.optimizer != "adamw" and not spec.scaling.use_gpu:
        problems.append(
            Problem(
                "train.optimizer",
                f"{spec.train.optimizer} is bitsandbytes' optimizer for CUDA GPUs, and this job "
                "trains on CPUs; set scaling.use_gpu: true, or train.optimizer: adamw.",
            )
        )
    if (
        "mlflow" in spec.train.report_to
        and spec.tracking.uri is None
        and "://" in spec.output.storage_path
        and not spec.output.storage_path.startswith("file://")
    ):
        problems.append(
            Problem(
                "tracking.uri",
                "train.report_to has mlflow and runs live in a store "
                f"({spec.output.storage_path}), where no MLflow file store can go; set "
                "tracking.uri to your MLflow server (http://...).",
            )
        )
    problems.extend(_selection_problems(spec))
    if spec.method == "qlora" and ds is not None and ds.stage == 3:
        problems.append(
            Problem(
                "scaling.deepspeed.stage",
                "QLoRA cannot run under ZeRO-3: the 4-bit base weights are not sharded by "
                "DeepSpeed, so every rank would hold the whole base anyway. Use single-GPU "
                "QLoRA workers instead (scaling.num_workers: N, gpus_per_worker: 1, "
                "no deepspeed section), which is data-parallel across GPUs.",
            )
        )
    if ds is not None and ds.offload_params != "none" and ds.stage != 3:
        problems.append(
            Problem(
                "scaling.deepspeed.offload_params",
                f"parameter offload needs ZeRO stage 3 (stage is {ds.stage}); "
                "set scaling.deepspeed.stage: 3 or offload_params: none.",
            )
        )
    if ds is not None and "nvme" in (ds.offload_params, ds.offload_optimizer) and not ds.nvme_path:
        problems.append(
            Problem(
                "scaling.deepspeed.nvme_path",
                "nvme offload needs a local NVMe folder: set scaling.deepspeed.nvme_path.",
            )
        )
    if spec.stage == "sft" and spec.dpo.parent is not None:
        problems.append(
            Problem(
                "dpo.parent",
                "a parent artifact is only used by stage: dpo; "
                "remove dpo.parent or set stage: dpo.",
            )
        )
    if spec.dpo.loss_type == "exo_pair" and spec.dpo.label_smoothing == 0:
        problems.append(
            Problem(
                "dpo.label_smoothing",
                "loss_type exo_pair divides by the label smoothing: set "
                "dpo.label_smoothing above 0 (1e-3 is TRL's suggestion).",
            )
        )
    problems.extend(_capacity_problems(spec))
    return problems


def same_file(a: str, b: str) -> bool:
    """Two local paths (or URIs) naming the same file."""
    if "://" in a or "://" in b:
        return a == b
    return os.path.abspath(a) == os.path.abspath(b)


def selection_problem(
    field: str, selection: list[str], domain: str | None, label: str = ""
) -> Problem | None:
    """A problem when the data a run is selected on is its held-out domain set."""
    if domain is None:
        return None
    shared = [f for f in selection if same_file(f, domain)]
    if not shared:
        return None
    return Problem(
        field,
        f"{label}{shared[0]} is also the held-out domain set (eval.domain): checkpoints and sweep "
        "trials would be selected on the questions the domain score reports, and the score "
        "would no longer be held out; select on a validation split of its own (the shipped "
        "one is data/domain/valid.jsonl), or set eval.allow_selection_on_domain: true.",
    )


def _selection_problems(spec: JobSpec) -> list[Problem]:
    if spec.eval.allow_selection_on_domain:
        return []
    found = selection_problem("data.eval", spec.data.eval, spec.eval.domain)
    return [found] if found else []


def _local_cluster() -> ClusterSpec:
    gpus = 0
    if shutil.which("nvidia-smi"):
        import torch  # only on machines that may have GPUs: importing torch takes seconds

        gpus = torch.cuda.device_count()
    return ClusterSpec(max_nodes=1, gpus_per_node=gpus, cpus_per_node=os.cpu_count() or 1)


def _capacity_problems(spec: JobSpec) -> list[Problem]:
    sc = spec.scaling
    cl = spec.cluster if "cluster" in spec.model_fields_set else _local_cluster()
    shape = f"{cl.max_nodes} node{'s' if cl.max_nodes > 1 else ''}"
    problems = []
    if sc.use_gpu:
        have = cl.max_nodes * cl.gpus_per_node
        want = sc.num_workers * sc.gpus_per_worker
        if cl.gpus_per_node == 0:
            problems.append(
                Problem(
                    "scaling.use_gpu",
                    "GPU workers requested but the cluster has no GPUs; describe it under "
                    "cluster: (gpus_per_node, max_nodes) or set scaling.use_gpu: false.",
                )
            )
        elif sc.gpus_per_worker > cl.gpus_per_node:
            problems.append(
                Problem(
                    "scaling.gpus_per_worker",
                    f"one worker asks for {sc.gpus_per_worker:g} GPUs but a node has only "
                    f"{cl.gpus_per_node}; a worker cannot span nodes.",
                )
            )
        elif want > have:
            problems.append(
                Problem(
                    "scaling.num_workers",
                    f"{sc.num_workers} workers × {sc.gpus_per_worker:g} GPU = {want:g} GPUs, "
                    f"but the cluster can never give more than {have} "
                    f"({shape} × {cl.gpus_per_node}); lower num_workers or raise "
                    "cluster.max_nodes.",
                )
            )
    if cl.cpus_per_node is None:
        return problems
    want_cpu = sc.num_workers * sc.cpus_per_worker
    have_cpu = cl.max_nodes * cl.cpus_per_node
    if sc.cpus_per_worker > cl.cpus_per_node:
        problems.append(
            Problem(
                "scaling.cpus_per_worker",
                f"one worker asks for {sc.cpus_per_worker:g} CPUs but a node has only "
                f"{cl.cpus_per_node}; lower cpus_per_worker.",
            )
        )
    elif want_cpu > have_cpu:
        problems.append(
            Problem(
                "scaling.num_workers",
                f"{sc.num_workers} workers × {sc.cpus_per_worker:g} CPU = {want_cpu:g} CPUs, "
                f"but the cluster can never give more than {have_cpu} "
                f"({shape} × {cl.cpus_per_node}); lower num_workers or cpus_per_worker, or "
                "describe the real cluster under cluster:.",
            )
        )
    return problems


def _missing(path: str) -> str | None:
    """Why `path` cannot be read, or None when it can."""
    if storage.is_uri(path) and storage.local_path(path) is None:
        try:
            return None if storage.exists(path) else f"'{path}' does not exist in its store"
        except storage.StorageError as e:
            return str(e)
    p = storage.local_path(path)
    if not p.exists():
        return f"'{path}' does not exist (relative paths start at {Path.cwd()})"
    if not os.access(p, os.R_OK):
        return f"'{path}' is not readable by this user"
    return None


def input_problems(spec: JobSpec) -> list[Problem]:
    """Every file, folder and artifact the spec names that cannot be read; all together, so
    `validate` and `submit` catch them before a run (or an upload) starts."""
    named: list[tuple[str, str]] = [(f"data.train.{i}", p) for i, p in enumerate(spec.data.train)]
    named += [(f"data.eval.{i}", p) for i, p in enumerate(spec.data.eval)]
    named += [
        (f"data.curate.decontaminate.benchmarks.{i}", p)
        for i, p in enumerate(spec.data.curate.decontaminate.benchmarks)
    ]
    named += [(f"eval.{k}", p) for k in ("domain", "general") if (p := getattr(spec.eval, k))]
    name = spec.model.name
    if name.endswith(".gguf") or name.startswith((".", "/", "~")):
        named.append(("model.name", name))
    problems = [Problem(field, why) for field, path in named if (why := _missing(path)) is not None]
    parent = spec.dpo.parent
    if parent is not None:
        candidates = [parent, storage.join(spec.output.registry, parent)]
        try:
            found = any(storage.is_file(storage.join(c, "ftservice.json")) for c in candidates)
        except storage.StorageError:
            found = False
        if not found:
            problems.append(
                Problem(
                    "dpo.parent",
                    f"no artifact '{parent}': neither a folder with ftservice.json nor a name "
                    f"in the registry {spec.output.registry} (output.registry); train the "
                    f"parent first, or `ftservice artifacts list {spec.output.registry}`",
                )
            )
    return problems


# ---- loading ---------------------------------------------------------------------------


def _line_index(node: yaml.Node, prefix: tuple = (), out: dict | None = None) -> dict:
    """Map each field path (tuple of keys/indices) to its 1-based YAML line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            out[path] = key_node.start_mark.line + 1
            _line_index(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*prefix, i)] = item.start_mark.line + 1
            _line_index(item, (*prefix, i), out)
    return out


def _nearest_line(lines: dict, path: tuple) -> int | None:
    # A missing field has no line of its own: fall back to its closest present parent.
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    """Valid keys at `path` (the parent of an unknown key), for "did you mean"."""
    for key in path:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _error_loc(e: dict) -> tuple:
    # pydantic puts union member tags into loc (e.g. 'list[str]', 'literal[...]'); drop them.
    return tuple(x for x in e["loc"] if not (isinstance(x, str) and ("[" in x or x == "literal")))


def _problems_from_validation(
    err: ValidationError, lines: dict, model: type[BaseModel] = JobSpec
) -> list[Problem]:
    problems = []
    for e in err.errors(include_url=False):
        loc = _error_loc(e)
        path = ".".join(str(x) for x in loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            valid = _field_names(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
            msg = f"unknown key '{loc[-1]}'"
            msg += f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        elif e["type"] == "missing" and loc in (("model",), ("model", "name")):
            path = "model.name"
            msg = (
                "required: name the base model to fine-tune (a built-in alias such as "
                "smollm2-135m-instruct, a local Hugging Face folder, a .gguf file, or a hub "
                "id org/name); there is no default, so a spec never trains a model by accident"
            )
        elif "input" in e and e["type"] != "missing":
            msg = f"{msg} (got {e['input']!r})"
        problems.append(Problem(path, msg, _nearest_line(lines, loc)))
    return problems


def _path_tuple(path: str) -> tuple:
    """'data.train.0' -> ('data', 'train', 0), the shape of the YAML line index's keys."""
    return tuple(int(k) if k.isdigit() else k for k in path.split("."))


def _drop_paths(data: dict, locs: list[tuple]) -> dict:
    """A copy of `data` without the values at `locs`, so defaults stand in for bad values.
    A bad list item drops its whole list (lists have defaults, their items do not)."""
    data = copy.deepcopy(data)
    for loc in locs:
        loc = tuple(loc)
        while loc and isinstance(loc[-1], int):
            loc = loc[:-1]
        parent = data
        for key in loc[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and loc:
            parent.pop(loc[-1], None)
    return data


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """'train.learning_rate=1e-4' -> (('train', 'learning_rate'), 0.0001); value parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(
            "command line",
            [Problem("", f"override '{text}' is not KEY=VALUE (example: train.max_steps=10)")],
        )
    # YAML reads '1e-4' as a string; pydantic's lax mode turns it into a float for float fields.
    value = yaml.safe_load(raw) if raw.strip() else ""
    return tuple(key.strip().split(".")), value


def apply_overrides(data: dict, overrides: list[str]) -> dict[tuple, str]:
    """Set each override into `data` in place; returns path -> original text for messages."""
    sources = {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
        sources[path] = text
    return sources


def read_yaml(path: str | os.PathLike, what: str = "job spec") -> tuple[dict, dict]:
    """A YAML spec file as a dict, and its line index; SpecError for what cannot be read."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(source, [Problem("", "file not found")]) from None
    except UnicodeDecodeError as e:
        raise SpecError(source, [Problem("", f"not UTF-8 text (byte {e.start})")]) from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise SpecError(source, [Problem("", f"not valid YAML: {e}", line)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            source, [Problem("", f"a {what} is a mapping of keys, got {type(data).__name__}", 1)]
        )
    return data, (_line_index(root) if root is not None else {})


def load_spec(
    path: str | os.PathLike, overrides: list[str] | None = None, check_inputs: bool = False
) -> JobSpec:
    """Read a YAML job spec, apply `key.sub=value` overrides, and check it all; with
    `check_inputs`, also that every file and artifact it names can be read.

    Raises SpecError listing every problem (file, field path, line) when it is not usable.
    """
    data, lines = read_yaml(path)
    return spec_from_dict(data, str(path), lines, overrides or [], check_inputs)


def spec_from_dict(
    data: dict,
    source: str = "<spec>",
    lines: dict | None = None,
    overrides: list[str] | None = None,
    check_inputs: bool = False,
) -> JobSpec:
    """Validate a spec given as a dict (after YAML) plus overrides; raises SpecError."""

    def checks(spec: JobSpec) -> list[Problem]:
        return cross_field_problems(spec) + (input_problems(spec) if check_inputs else [])

    return validate_spec(JobSpec, data, source, lines, overrides, checks)


def validate_spec(
    model: type[S],
    data: dict,
    source: str,
    lines: dict | None,
    overrides: list[str] | None,
    checks: Callable[[S], list[Problem]],
) -> S:
    """Any spec: field errors first; then, with the bad values replaced by their defaults,
    the checks between fields, so that one run reports every problem."""
    lines = lines or {}
    override_sources = apply_overrides(data, overrides or [])
    problems: list[Problem] = []
    spec = None
    candidate = data
    dropped: list[str] = []
    for _ in range(3):
        try:
            spec = model.model_validate(candidate)
            break
        except ValidationError as e:
            # an error at a parent of a value already dropped is the drop's doing (an empty
            # or missing section), not the user's: reported once, where it was
            problems += [
                p for p in _problems_from_validation(e, lines, model)
                if not any(d == p.path or d.startswith(p.path + ".") for d in dropped)
            ]  # fmt: skip
            dropped += [".".join(map(str, _error_loc(x))) for x in e.errors()]
            candidate = _drop_paths(candidate, [_error_loc(x) for x in e.errors()])
            # a required field has no default to stand in: a placeholder does, so that the
            # checks between fields still run (its own problem is reported above)
            if any(x["type"] == "missing" and _error_loc(x)[:1] == ("model",) for x in e.errors()):
                base = candidate.get("model") if isinstance(candidate.get("model"), dict) else {}
                candidate = {**candidate, "model": {**base, "name": "(missing)"}}
    if spec is not None:
        for p in checks(spec):
            loc = _path_tuple(p.path)
            problems.append(Problem(p.path, p.message, _nearest_line(lines, loc)))
    if problems:
        located = []
        for p in problems:
            loc = _path_tuple(p.path)
            src = next((t for k, t in override_sources.items() if loc[: len(k)] == k), None)
            located.append(dataclasses.replace(p, override=src))
        raise SpecError(source, located)
    return spec


def dump_spec(spec: BaseModel) -> str:
    """The fully resolved spec as YAML (defaults filled in), stable key order."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
