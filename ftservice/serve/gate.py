"""The compatibility gate: what an adapter must pass before it is ever served.

In order: a registry name (no path, no traversal, in any encoding); an artifact of this
ftservice; adapter weights (a full fine-tune is a base of its own); trained on the base being
served (fingerprints equal); safetensors only; a rank within the spec's cap; every adapted
module present in the base with the shapes the adapter expects; and for an adapter trained on
a 4-bit base (QLoRA), served here on the 16-bit base, its outputs on probe prompts close to
those on the 4-bit base it was trained on (mean per-token KL below the spec's threshold).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote

import torch
from safetensors import safe_open

from ftservice.artifacts import (
    PICKLE_SUFFIXES,
    Artifact,
    ArtifactError,
    list_artifacts,
    load_artifact,
)
from ftservice.config import NAME_PATTERN, JobSpec
from ftservice.models import ResolvedModel, load_base_for_adapters, load_causal_lm
from ftservice.records import HandoffError
from ftservice.serve.engine import LORA_KEY, unsupported_lora_features
from ftservice.serve.spec import GateSpec, ServeSpec

PROBES = [
    "Tell me about your warranty.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How do I reset my password?",
    "List three colours.",
    "Summarise the water cycle.",
]


@dataclass
class Verdict:
    name: str
    servable: bool
    reason: str | None = None
    location: str | None = None
    rank: int | None = None
    method: str | None = None
    probe_kl: float | None = None
    checks: list[str] = field(default_factory=list)
    """The checks passed, in order."""

    def to_json(self) -> dict:
        return asdict(self)


class GateRefusal(ArtifactError):
    """An adapter the gate refuses; the message says why and what to do."""


def check_name(name: str) -> None:
    """A registry name, never a path: '../x', '/abs' and '%2e%2e%2f' forms are refused."""
    decoded = name
    for _ in range(3):  # double encoding too
        decoded = unquote(decoded)
    if re.match(NAME_PATTERN, name) and decoded == name and ".." not in name:
        return
    raise GateRefusal(
        f"'{name}' is not an adapter name: names match {NAME_PATTERN} (no '/', '..', '%' "
        "or absolute paths); use the artifact's name in the registry."
    )


def base_modules(base: ResolvedModel) -> dict[str, tuple[int, int]]:
    """Every Linear module of the base: name -> (in_features, out_features), from the config
    on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(base.path, trust_remote_code=base.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=base.trust_remote_code)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def candidates(spec: ServeSpec) -> list[tuple[str, Artifact]]:
    """Every artifact the spec selects, with its registry; a name in two registries is the
    first one's."""
    found, seen = [], set()
    for registry in spec.registries:
        for artifact in list_artifacts(registry):
            if artifact.name not in seen and spec.wants(artifact.name):
                seen.add(artifact.name)
                found.append((registry, artifact))
    return found


class Gate:
    def __init__(self, base: ResolvedModel, spec: GateSpec):
        self.base = base
        self.spec = spec
        self.modules = base_modules(base)

    def check(self, name: str, registries: list[str]) -> tuple[Verdict, Artifact | None]:
        """The verdict on the artifact `name` of the first registry that has it."""
        verdict = Verdict(name=name, servable=False)
        try:
            artifact = self._check(name, registries, verdict)
        except (GateRefusal, ArtifactError, HandoffError) as e:
            verdict.reason = str(e)
            return verdict, None
        verdict.servable = True
        return verdict, artifact

    def _check(self, name: str, registries: list[str], verdict: Verdict) -> Artifact:
        check_name(name)
        verdict.checks.append("name")
        artifact = None
        for registry in registries:
            try:
                artifact = load_artifact(name, registry)
                break
            except ArtifactError:
                continue
        if artifact is None:
            raise GateRefusal(f"no artifact '{name}' in {', '.join(registries)}")
        verdict.location, verdict.method = artifact.location, artifact.method
        verdict.checks.append("artifact")
        if not artifact.is_adapter:
            raise GateRefusal(
                f"{name} holds full weights ({artifact.method}), not an adapter: serve it as a "
                f"base of its own, with a serve spec whose model.name is {artifact.location}."
            )
        if artifact.base_fingerprint != self.base.fingerprint:
            trained = artifact.meta.base_model
            raise GateRefusal(
                f"{name} was trained on base '{trained.name}' (fingerprint "
                f"{trained.fingerprint[:12]}), but this app serves '{self.base.name}' "
                f"(fingerprint {self.base.fingerprint[:12]}); serve it with its own base."
            )
        verdict.checks.append("base fingerprint")
        folder = artifact.path
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        weights = folder / "adapter_model.safetensors"
        if pickles or not weights.is_file():
            found = f"pickle files ({', '.join(pickles)})" if pickles else "no weights"
            raise GateRefusal(
                f"{name}: adapters are served from safetensors only, and it has {found}; "
                "re-save it with save_pretrained(..., safe_serialization=True)."
            )
        verdict.checks.append("safetensors")
        config = json.loads((folder / "adapter_config.json").read_text())
        rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
        verdict.rank = rank
        if rank > self.spec.max_lora_rank:
            raise GateRefusal(
                f"{name} has LoRA rank {rank}, above this app's cap gate.max_lora_rank "
                f"{self.spec.max_lora_rank}; raise the cap (more memory per adapter slot) or "
                "serve a lower-rank adapter."
            )
        verdict.checks.append("rank")
        features = unsupported_lora_features(config)
        if features:
            raise GateRefusal(
                f"{name} uses {', '.join(features)}, which this app's engine does not serve; "
                "train it as plain LoRA, or merge it (`ftservice export --merge`) and serve "
                "the result as a base."
            )
        verdict.checks.append("plain lora")
        self._check_modules(name, weights)
        verdict.checks.append("modules")
        if artifact.method == "qlora":
            verdict.probe_kl = self.qlora_probe_kl(artifact)
            if verdict.probe_kl > self.spec.qlora_max_kl:
                raise GateRefusal(
                    f"{name} was trained on a 4-bit base; on the 16-bit base its answers "
                    f"drift by KL {verdict.probe_kl:.4f} nats/token on the probe prompts, above "
                    f"gate.qlora_max_kl {self.spec.qlora_max_kl}; serve it on the 4-bit base, "
                    "or raise the threshold."
                )
            verdict.checks.append("qlora probe")
        return artifact

    def _check_modules(self, name: str, weights: Path) -> None:
        with safe_open(str(weights), framework="pt") as st:
            shapes = {key: st.get_slice(key).get_shape() for key in st.keys()}  # noqa: SIM118
        for key, shape in shapes.items():
            m = LORA_KEY.match(key.replace(".default.", "."))
            if m is None:
                continue
            module = m.group("module")
            if module not in self.modules:
                raise GateRefusal(
                    f"{name} adapts module '{module}', which the base '{self.base.name}' does "
                    "not have; it was trained for another architecture."
                )
            in_features, out_features = self.modules[module]
            want = in_features if m.group("part") == "A" else out_features
            got = shape[1] if m.group("part") == "A" else shape[0]
            if got != want:
                raise GateRefusal(
                    f"{name}: {key} has shape {list(shape)}, but the base's '{module}' takes "
                    f"{in_features} → {out_features} features; it was trained for another "
                    "model size."
                )

    @torch.no_grad()
    def qlora_probe_kl(self, artifact: Artifact) -> float:
        """Mean per-token KL(4-bit + adapter ‖ 16-bit + adapter) over greedy answers to the
        probe prompts, as the adapter's training base (NF4, the spec's settings) saw them."""
        from peft import PeftModel
        from transformers import AutoTokenizer

        job = JobSpec.model_validate(artifact.meta.spec)
        tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        four = PeftModel.from_pretrained(load_base_for_adapters(job, self.base), artifact.path)
        full = PeftModel.from_pretrained(load_causal_lm(self.base), artifact.path)
        total, tokens = 0.0, 0
        for text in PROBES[: self.spec.qlora_probe_prompts]:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )["input_ids"]  # fmt: skip
            out = full.generate(ids, max_new_tokens=16, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            p = torch.log_softmax(four(out).logits[0, ids.shape[1] - 1 : -1].float(), -1)
            q = torch.log_softmax(full(out).logits[0, ids.shape[1] - 1 : -1].float(), -1)
            total += torch.sum(p.exp() * (p - q)).item()
            tokens += p.shape[0]
        return total / max(tokens, 1)
