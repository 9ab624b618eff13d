"""The serve spec: what one serving app is (base, registries, adapters, replicas, batching,
caps, the store, where it listens), typed like the job spec and checked the same way."""

from __future__ import annotations

import fnmatch
import os
from typing import Any, Literal

from pydantic import Field, field_validator

from ftservice.config import ModelSpec, Problem, Spec, SpecError, read_yaml, validate_spec
from ftservice.feedback.campaign import CampaignSpec, campaign_problems, load_campaign
from ftservice.serve.finetune_spec import settable

SERVE_KEYS = {"registries", "adapters", "replicas", "batching", "store", "limits", "campaigns"}
"""Top-level keys only a serve spec has: how `ftservice validate` tells the kinds apart."""


class AutoscalingSpec(Spec):
    min_replicas: int = Field(1, ge=0, description="Fewest model replicas.")
    max_replicas: int = Field(2, ge=1, description="Most model replicas.")
    target_ongoing_requests: float = Field(
        4, gt=0, description="Requests per replica the autoscaler aims for."
    )


class ReplicasSpec(Spec):
    num: int = Field(1, ge=1, description="Model replicas (when autoscaling is unset).")
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale between min and max replicas by load instead of a fixed num."
    )
    cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs per model replica; fractional, so a Ray Train job still fits beside "
        "the app on a small machine (Serve's own default is 1).",
    )
    gpus: float = Field(0, ge=0, description="GPUs per model replica (fractional allowed).")
    ingress_cpus: float = Field(0.1, gt=0, description="CPUs of each ingress replica.")
    torch_threads: int = Field(1, ge=1, description="Intra-op threads of a CPU replica.")
    max_adapters: int = Field(
        8, ge=1, description="Adapters held per replica (least recently used ones evicted)."
    )


class BatchingSpec(Spec):
    max_batch_size: int = Field(8, ge=1, description="Most requests in one forward batch.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="How long a batch waits to fill before it runs."
    )


class GenerationSpec(Spec):
    max_tokens: int = Field(256, ge=1, description="New tokens when a request names none.")
    temperature: float = Field(1.0, ge=0, le=2, description="Default temperature (OpenAI's).")
    top_p: float = Field(1.0, gt=0, le=1, description="Default nucleus sampling mass.")
    system_prompt: Literal["trained", "none"] = Field(
        "trained",
        description="trained: an adapter's training system prompt is added when a request "
        "brings none (serve what was trained); none: only what the request says.",
    )


class LimitsSpec(Spec):
    max_tokens: int = Field(1024, ge=1, description="Cap on a request's max_tokens (400 over).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Cap on prompt tokens; unset: the model's context length."
    )
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (413 over).")
    max_queued_requests: int = Field(
        64, ge=1, description="Requests waiting per model replica (503 over)."
    )
    request_timeout_s: float = Field(120, gt=0, description="A request's deadline (408).")
    requests_per_minute: int | None = Field(
        None, ge=1, description="Per-key rate limit (429 with Retry-After); unset: none."
    )


class GateSpec(Spec):
    max_lora_rank: int = Field(64, ge=1, description="Adapters of a higher rank are refused.")
    qlora_probe_prompts: int = Field(
        4, ge=1, description="Probe prompts for a QLoRA-trained adapter on the 16-bit base."
    )
    qlora_max_kl: float = Field(
        0.05,
        gt=0,
        description="Mean per-token KL(NF4+adapter ‖ 16-bit+adapter) on the probes above "
        "which a QLoRA-trained adapter is refused.",
    )


class StoreSpec(Spec):
    url: str = Field(
        "sqlite:///state/ftservice.db",
        description="The service's database (SQLAlchemy URL): SQLite in the git-ignored "
        "state/ folder by default, or postgresql+psycopg://... .",
    )


class JobsSpec(Spec):
    storage: str = Field(
        "state/jobs",
        description="The fine-tuning API's folder: uploaded files, resolved job specs and "
        "runs (git-ignored state/ by default; on a cluster, a shared filesystem every node "
        "sees).",
    )
    max_file_bytes: int = Field(
        64 << 20, ge=1024, description="Largest file one upload may be (413 over)."
    )
    max_project_bytes: int = Field(
        1 << 30, ge=1024, description="Most bytes of files one project may keep (413 over)."
    )
    max_concurrent_jobs: int = Field(
        2, ge=1, description="Jobs one project may have queued or running at once (429 over)."
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Job spec fields every API job starts from (e.g. scaling.use_gpu: true), "
        "as dotted paths; a request's `ftservice` object overrides them.",
    )
    ray_address: str | None = Field(
        None,
        description="The Ray Jobs API the jobs run on (http://head:8265); default: the "
        "cluster the app runs on.",
    )


class VLLMSpec(Spec):
    python: str = Field(
        ".venv-vllm/bin/python",
        description="The vLLM environment's interpreter, which model replicas run (Ray's "
        "`py_executable`); a relative path is from the folder `serve run` starts in. "
        "`make vllm-env` builds .venv-vllm; a cluster image has its own path.",
    )
    kv_cache_gib: int = Field(
        1, ge=1, description="KV cache per CPU replica in GiB (VLLM_CPU_KVCACHE_SPACE, whole)."
    )
    zero_base: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Serve the base as a zero adapter, so base rows never take another "
        "adapter's slot (vLLM 0.32's CPU LoRA kernels do that); auto: on CPU replicas.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More vLLM engine arguments (gpu_memory_utilization, ...), over ours.",
    )


class ServeSpec(Spec):
    """One serving app: a base model and the adapters of one or more registries."""

    name: str = Field(
        "ftservice", pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Serve application name."
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Model deployment: transformers + PEFT (CPU and GPU; the faster on CPU), "
        "or vllm: Ray Serve LLM's vLLM engine with multi-LoRA (for GPUs), in its own "
        "environment (`vllm.python`).",
    )
    vllm: VLLMSpec = Field(
        default_factory=lambda: VLLMSpec(), description="Settings of `backend: vllm`."
    )
    model: ModelSpec = Field(description="The base model (required), resolved as in job specs.")
    base_name: str | None = Field(
        None, description="The base's name on the API (`model`); unset: model.name."
    )
    registries: list[str] = Field(
        default_factory=lambda: ["artifacts"],
        min_length=1,
        description="Registries (folders or URIs) whose adapters may be served.",
    )
    adapters: Literal["all"] | list[str] = Field(
        "all", description="'all' compatible adapters, or a list of names and globs (sft-*)."
    )
    replicas: ReplicasSpec = Field(default_factory=ReplicasSpec, description="Model replicas.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Request batching.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Generation defaults."
    )
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Caps on requests.")
    gate: GateSpec = Field(default_factory=GateSpec, description="Compatibility gate.")
    store: StoreSpec = Field(default_factory=StoreSpec, description="The service's database.")
    jobs: JobsSpec = Field(
        default_factory=JobsSpec, description="The fine-tuning API: files, jobs, their limits."
    )
    host: str = Field("127.0.0.1", description="Address the HTTP server listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP server.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; none unless listed."
    )
    log_prompts: bool = Field(False, description="Put prompt text in the access log.")
    campaigns: list[CampaignSpec] = Field(
        default_factory=list,
        description="Preference campaigns the comparison page (/arena) runs: campaign files "
        "(YAML, read when the spec is) or campaigns written inline.",
    )

    @field_validator("campaigns", mode="before")
    @classmethod
    def _read_campaign_files(cls, value):
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, str):
                try:
                    item = load_campaign(item).model_dump()
                except SpecError as e:
                    raise ValueError(str(e)) from None
            out.append(item)
        return out

    def wants(self, name: str) -> bool:
        """Whether `adapters` selects an artifact of this name."""
        if self.adapters == "all":
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.adapters)

    def model_options(self) -> dict:
        """Serve's options for the model deployment, whichever backend runs it: replicas or
        autoscaling, resources, queue cap, health checks."""
        replicas = self.replicas
        options = {
            "ray_actor_options": {"num_cpus": replicas.cpus, "num_gpus": replicas.gpus},
            "max_queued_requests": self.limits.max_queued_requests,
            "max_ongoing_requests": max(self.batching.max_batch_size * 2, 8),
            "health_check_period_s": 10,
            "health_check_timeout_s": 60,
        }
        if replicas.autoscaling is not None:
            options["autoscaling_config"] = replicas.autoscaling.model_dump()
        else:
            options["num_replicas"] = replicas.num
        return options


def serve_problems(spec: ServeSpec) -> list[Problem]:
    problems = []
    auto = spec.replicas.autoscaling
    if auto is not None and auto.min_replicas > auto.max_replicas:
        problems.append(
            Problem(
                "replicas.autoscaling.min_replicas",
                f"min_replicas {auto.min_replicas} is above max_replicas {auto.max_replicas}",
            )
        )
    if spec.generation.max_tokens > spec.limits.max_tokens:
        problems.append(
            Problem(
                "generation.max_tokens",
                f"the default max_tokens {spec.generation.max_tokens} is above the cap "
                f"limits.max_tokens {spec.limits.max_tokens}; lower it or raise the cap",
            )
        )
    for i, campaign in enumerate(spec.campaigns):
        for problem in campaign_problems(campaign):
            problem.path = f"campaigns.{i}.{problem.path}"
            problems.append(problem)
    for path in spec.jobs.defaults:
        if not settable(path):
            problems.append(Problem(
                f"jobs.defaults.{path}",
                "not a training field the API sets (method, lora.*, quantization.*, train.*, "
                "scaling.*, checkpoint.*, dpo.beta, data.max_seq_length, ...); files, the "
                "model and outputs are the API's own",
            ))  # fmt: skip
    names = [c.name for c in spec.campaigns]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(
                Problem(f"campaigns.{i}.name", f"campaign '{name}' is listed twice; rename one")
            )
    return problems


def is_serve_spec(data: dict) -> bool:
    return bool(SERVE_KEYS & set(data))


def load_serve_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> ServeSpec:
    """Read a YAML serve spec with overrides; SpecError lists every problem with its line."""
    data, lines = read_yaml(path, "serve spec")
    return validate_spec(ServeSpec, data, str(path), lines, overrides, serve_problems)
