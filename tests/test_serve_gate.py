"""The compatibility gate refuses what cannot be served, each with its reason, before any
replica loads it; what passes is recorded with the checks it passed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_serve_engine import write_adapter

from ftservice.artifacts import BaseModelRef, publish
from ftservice.config import ModelSpec, spec_from_dict
from ftservice.models import resolve_model
from ftservice.serve.gate import Gate, GateRefusal, check_name
from ftservice.serve.spec import GateSpec


def publish_adapter(registry: Path, name: str, weights: Path, base, method: str = "lora"):
    spec = spec_from_dict(
        {"name": name, "model": {"name": str(base.path)}, "method": method}
    ).model_dump(mode="json")
    ref = BaseModelRef(name=str(base.path), fingerprint=base.fingerprint, kind="folder",
                       load_as=str(base.path))  # fmt: skip
    return publish(
        registry, name, weights, spec=spec, run_name=f"run-{name}", base_model=ref,
        dataset_fingerprint="d" * 64, data=[], metrics={}, log_history=[],
    )  # fmt: skip


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_llama, other_tiny_llama) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gate")
    reg = root / "registry"
    tiny, other = resolve_model(ModelSpec(name=str(tiny_llama))), None
    other = resolve_model(ModelSpec(name=str(other_tiny_llama)))
    publish_adapter(reg, "good", write_adapter(root / "good", tiny_llama, 1), tiny)
    publish_adapter(reg, "other-base", write_adapter(root / "ob", other_tiny_llama, 2), other)
    publish_adapter(reg, "nf4", write_adapter(root / "nf4", tiny_llama, 3), tiny, "qlora")
    # a pickle-only adapter, put there by hand (publish itself refuses pickles)
    shutil.copytree(reg / "good", reg / "pickled")
    (reg / "pickled" / "adapter_model.safetensors").rename(reg / "pickled" / "adapter_model.bin")
    # an adapter for a model of another size, claiming the served base
    small = root / "small"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    ).save_pretrained(small)  # fmt: skip
    publish_adapter(reg, "wrong-shape", write_adapter(root / "ws", small, 4), tiny)
    full = root / "full"
    shutil.copytree(tiny_llama, full)
    publish_adapter(reg, "full-ft", full, tiny, "full")
    return reg


@pytest.fixture(scope="module")
def gate(tiny_llama) -> Gate:
    return Gate(resolve_model(ModelSpec(name=str(tiny_llama))), GateSpec(max_lora_rank=8))


def test_a_compatible_adapter_passes_every_check(gate, registry):
    verdict, artifact = gate.check("good", [str(registry)])
    assert verdict.servable and verdict.reason is None and artifact.name == "good"
    assert verdict.checks == ["name", "artifact", "base fingerprint", "safetensors", "rank",
                              "plain lora", "modules"]  # fmt: skip
    assert verdict.rank == 4


@pytest.mark.parametrize(
    ("name", "parts"),
    [  # what is wrong, and the fix
        ("other-base", [r"\(fingerprint [0-9a-f]{12}\).*\(fingerprint [0-9a-f]{12}\)",
                        r"own base"]),
        ("pickled", [r"adapter_model\.bin", r"safe_serialization=True"]),
        ("wrong-shape", [r"lora_A\.weight", r"\[4, 64\]", r"128 → 64"]),
        ("full-ft", [r"full weights", r"model\.name"]),
        ("missing", [r"no artifact 'missing'"]),
    ],
)  # fmt: skip
def test_the_gate_refuses_with_the_reason(gate, registry, name, parts):
    verdict, artifact = gate.check(name, [str(registry)])
    assert not verdict.servable and artifact is None
    assert verdict.reason is not None and name in verdict.reason, verdict.reason
    for part in parts:
        assert re.search(part, verdict.reason), verdict.reason


def test_a_rank_over_the_cap_is_refused(tiny_llama, registry):
    strict = Gate(resolve_model(ModelSpec(name=str(tiny_llama))), GateSpec(max_lora_rank=2))
    verdict, _ = strict.check("good", [str(registry)])
    assert not verdict.servable
    reason = verdict.reason
    assert "good" in reason and "rank 4" in reason, reason
    assert "gate.max_lora_rank 2" in reason and "lower-rank" in reason, reason


@pytest.mark.parametrize(
    "name", ["../good", "/etc/passwd", "%2e%2e%2fgood", "%252e%252e%252fgood", "good/../good",
             "Good", ""],
)  # fmt: skip
def test_names_that_are_paths_are_refused_before_any_file_is_read(gate, registry, name):
    with pytest.raises(GateRefusal, match="is not an adapter name"):
        check_name(name)
    verdict, _ = gate.check(name, [str(registry)])
    assert not verdict.servable and verdict.checks == []


def test_a_qlora_adapter_on_the_16bit_base_is_probed_and_refused_above_the_threshold(
    tiny_llama, registry
):
    base = resolve_model(ModelSpec(name=str(tiny_llama)))
    loose = Gate(base, GateSpec(qlora_max_kl=10.0, qlora_probe_prompts=2))
    verdict, _ = loose.check("nf4", [str(registry)])
    assert verdict.servable and verdict.checks[-1] == "qlora probe"
    assert 0 < verdict.probe_kl < 10.0  # NF4 rounding moves the outputs a little, not a lot
    tight = Gate(base, GateSpec(qlora_max_kl=verdict.probe_kl / 2, qlora_probe_prompts=2))
    refused, _ = tight.check("nf4", [str(registry)])
    assert not refused.servable and "was trained on a 4-bit base" in refused.reason
    assert refused.probe_kl == pytest.approx(verdict.probe_kl)
