"""A fine-tuning job request (OpenAI's shape) and the job spec it becomes.

The mapping, as documented in the README:
- `model`: the app's base model (supervised or DPO), or one of its fine-tuned models (DPO:
  the new adapter is trained from it, `dpo.parent`);
- `method.type`: supervised → `stage: sft`; dpo → `stage: dpo`;
- `n_epochs` → `train.epochs`; `batch_size` is the global batch: micro-batch × gradient
  accumulation × workers, with the micro-batch the largest divisor of batch / workers up to
  the spec's `train.micro_batch_size`; `learning_rate_multiplier` multiplies the learning
  rate the job would have without it (the job spec's default, or the service's and the
  request's setting); `beta` → `dpo.beta`; `seed` → `train.seed`;
- `suffix` → the artifact's name, `ft-<suffix>-<8 hex of the job id>` in the registry's
  name pattern (lowercase, other characters replaced), so it is unique;
- `ftservice`: job spec overrides by dotted path (`method: qlora`, `lora.r: 8`, scaling),
  on top of the service's `jobs.defaults`; fields that name files, folders, the model or
  where results go are the API's own and are refused.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ftservice.serve.protocol import ApiError

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto | None = Field(None, ge=1, le=50)
    batch_size: int | Auto | None = Field(None, ge=1, le=4096)
    learning_rate_multiplier: float | Auto | None = Field(None, gt=0, le=100)
    beta: float | Auto | None = Field(None, gt=0, le=10)


class MethodHyperparameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: MethodHyperparameters | None = None
    dpo: MethodHyperparameters | None = None


class CreateJob(BaseModel):
    """`POST /v1/fine_tuning/jobs`. Fields OpenAI's client sends that we do not use
    (integrations) are ignored, as OpenAI's server ignores what it does not know."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str | None = Field(None, max_length=40)
    hyperparameters: Hyperparameters | None = None  # the older, top-level spelling
    method: Method = Field(default_factory=Method)
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    ftservice: dict[str, Any] = Field(default_factory=dict)

    def hyper(self) -> Hyperparameters:
        chosen = getattr(self.method, "dpo" if self.method.type == "dpo" else "supervised")
        if chosen is not None:
            return chosen.hyperparameters
        return self.hyperparameters or Hyperparameters()


# What `ftservice` may set: training settings. Files, folders, the model and where results
# go are the API's own (a request must not read or write the service's disk at will).
ALLOWED = ("method", "lora.", "quantization.", "train.", "scaling.", "checkpoint.",
           "dpo.beta", "dpo.loss_type", "dpo.label_smoothing", "dpo.sft_weight",
           "data.max_seq_length", "data.packing", "data.completion_only_loss",
           "data.system_prompt", "eval.every_steps")  # fmt: skip
REFUSED = ("train.report_to",)  # trackers write where the service says, not the request


def settable(path: str) -> bool:
    """Whether the API lets a request (or the service's defaults) set this job spec field."""
    allowed = any(path == a or (a.endswith(".") and path.startswith(a)) for a in ALLOWED)
    return allowed and path not in REFUSED


def overrides(fields: dict[str, Any], where: str) -> list[str]:
    """Job spec overrides (`path=value`, values as JSON, which YAML reads) of dotted paths."""
    out = []
    for path, value in fields.items():
        if not settable(path):
            raise ApiError(
                400,
                f"{where}.{path}: not settable through the API; set training fields "
                "(method, lora.*, quantization.*, train.*, scaling.*, checkpoint.*, dpo.beta, "
                "data.max_seq_length, ...); files, the model and outputs are the API's",
                param=f"{where}.{path}",
            )
        out.append(f"{path}={json.dumps(value)}")
    return out


def artifact_name(suffix: str | None, job_id: str) -> str:
    """ft-<suffix>-<8 hex of the job>: the registry's name pattern, unique per job."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", (suffix or "").lower()).strip("-._")[:40]
    return f"ft-{stem}-{job_id[6:14]}" if stem else f"ft-{job_id[6:14]}"


def batch_settings(batch: int, workers: int, micro_cap: int) -> dict[str, int]:
    """Micro-batch and accumulation for a global batch over `workers` workers."""
    if batch % workers:
        raise ApiError(
            400,
            f"batch_size {batch} does not split over {workers} workers; use a multiple of "
            f"{workers}",
            param="method.hyperparameters.batch_size",
        )
    per_worker = batch // workers
    micro = max(d for d in range(1, min(micro_cap, per_worker) + 1) if per_worker % d == 0)
    return {"micro_batch_size": micro, "gradient_accumulation_steps": per_worker // micro}
