"""The memory planner: published claims, DeepSpeed's own estimator, the CLI, and refusal."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ftservice.config import load_spec
from ftservice.memory import (
    GiB,
    PlanError,
    PlanInput,
    plan,
    plan_for_spec,
    plan_with_verdict,
    resolve_shape,
    zero3_model_states,
)

REPO = Path(__file__).resolve().parents[1]


def test_family_shapes_match_their_published_parameter_counts():
    # billions, from the model cards
    for name, billions in [
        ("meta-llama/Meta-Llama-3-8B-Instruct", 8.03),
        ("meta-llama/Llama-3.1-70B", 70.55),
        ("mistralai/Mistral-7B-v0.1", 7.24),
        ("Qwen/Qwen2.5-7B-Instruct", 7.62),
        ("Qwen/Qwen2.5-72B", 72.7),
        ("meta-llama/Llama-2-7b-hf", 6.74),
    ]:
        assert resolve_shape(name).total_params / 1e9 == pytest.approx(billions, rel=0.01), name


def test_llama3_8b_lora_r8_fits_one_24gb_gpu():
    p = PlanInput(resolve_shape("llama-3-8b"), method="lora", lora_r=8, device_mem_gb=24)
    result = plan_with_verdict(p)
    assert result.fits
    assert 16 * GiB < result.total_bytes < 24 * GiB  # the bf16 base alone is 15 GiB
    assert result.cheapest["method"] in ("lora", "qlora") and result.cheapest["gpus_per_node"] == 1
    # full fine-tuning of the same model does not fit that GPU without offload
    full = plan(replace(p, method="full", zero3=False))
    assert not full.fits


def test_70b_qlora_fits_one_48gb_gpu_and_65b_as_in_the_qlora_paper():
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    for model in ("llama-3-70b", "llama-65b"):
        p = PlanInput(
            resolve_shape(model), method="qlora", lora_targets=attention, seq_len=512,
            device_mem_gb=48,
        )  # fmt: skip
        result = plan(p)
        assert result.fits, (model, result.total_bytes / GiB)
        # the 4-bit base is about a quarter of the bf16 one
        ratio = result.per_device["weights_4bit"] / (2 * p.shape.quantizable_params)
        assert 0.25 < ratio < 0.27
        assert not plan(replace(p, method="lora")).fits  # 16-bit LoRA of 70B does not


def test_70b_full_needs_zero3_with_cpu_offload_on_8x80gb():
    shape = resolve_shape("llama-3-70b")
    base = PlanInput(shape, method="full", gpus=8, device_mem_gb=80, cpu_mem_gb=2048)
    assert not plan(base).fits  # ZeRO-3 without offload: 18 B/param / 8 ranks > 80 GB
    offloaded = plan(replace(base, offload="cpu"))
    assert offloaded.fits
    assert offloaded.cpu_per_node_bytes <= 2048 * GiB  # the optimizer states' RAM is there
    assert not plan(replace(base, offload="cpu", cpu_mem_gb=512)).fits  # but not on 512 GB


@pytest.mark.parametrize("offload", ["none", "cpu"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 2), (4, 4)])
@pytest.mark.parametrize("model", ["llama-3-8b", "llama-3-70b", "qwen2.5-7b"])
def test_zero3_model_states_reproduce_deepspeeds_estimator(model, gpus, nodes, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = resolve_shape(model)
    for offload_params in ("none", "cpu") if offload == "cpu" else ("none",):
        p = PlanInput(
            shape, method="full", gpus=gpus, nodes=nodes, offload=offload,
            offload_params=offload_params,
        )  # fmt: skip
        theirs = estimate_zero3_model_states_mem_needs(
            shape.total_params, shape.largest_layer_params, num_gpus_per_node=gpus,
            num_nodes=nodes, cpu_offload=offload != "none",
            cpu_offload_params=offload_params != "none", zero_init=True,
        )  # fmt: skip
        assert zero3_model_states(p) == theirs
        assert plan(p).per_device["model_states_zero3"] == theirs[1]


def test_largest_layer_and_total_match_a_real_model(tiny_llama):
    """Counted from config.json against the parameters of the instantiated model."""
    from transformers import AutoModelForCausalLM

    shape = resolve_shape(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    biggest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert shape.largest_layer_params == biggest


def test_dpo_with_adapters_adds_tokens_not_a_model_copy():
    p = PlanInput(resolve_shape("llama-3-8b"), method="lora", seq_len=1024, device_mem_gb=80)
    sft, dpo = plan(p), plan(replace(p, stage="dpo"))
    assert dpo.per_device["weights"] == sft.per_device["weights"]
    assert dpo.per_device["activations"] == 2 * sft.per_device["activations"]  # chosen + rejected
    assert dpo.per_device["dpo_reference_adapter"] < 0.02 * sft.per_device["weights"]


def test_unknown_inputs_are_refused_with_what_to_use():
    with pytest.raises(PlanError, match="one of llama-3-8b"):
        resolve_shape("acme/unknown-13b")
    with pytest.raises(PlanError, match="not linear layers"):
        plan(PlanInput(resolve_shape("llama-3-8b"), lora_targets=["attn"]))


def test_every_shipped_cluster_spec_validates_and_plans_to_fit():
    for spec_file in sorted((REPO / "cluster/jobs").glob("*.yaml")):
        if spec_file.name in ("quickstart.yaml", "dpo-lora.yaml", "loop-dpo.yaml"):
            continue  # local specs, planned by the CLI tests on this machine's RAM
        result = plan_for_spec(load_spec(spec_file))
        assert result.fits is True, spec_file.name


def cli(*args, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ftservice", *args], capture_output=True, text=True, env=env,
        cwd=cwd, timeout=600,
    )  # fmt: skip


def test_plan_cli_for_a_model_and_a_spec(cli_env):
    out = cli("plan", "--model", "llama-3-70b", "--method", "full", "--gpus", "8",
              "--gpu-mem", "80", "--json", env=cli_env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["fits"] is False
    assert result["cheapest"]["method"] == "qlora"
    text = cli("plan", "cluster/jobs/llama3-70b-full-zero3.yaml", env=cli_env)
    assert text.returncode == 0, text.stderr
    assert "verdict: fits in 80 GiB" in text.stdout and "CPU RAM per node" in text.stdout
    bad = cli("plan", "--model", "llama-3-8b", "--method", "fulll", env=cli_env)
    assert bad.returncode != 0 and "--method fulll: use one of full, lora, qlora" in bad.stderr


def test_train_refuses_a_plan_that_cannot_fit_before_starting_ray(tmp_path, cli_env, tiny_llama):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: toolarge\nmodel:\n  name: {tiny_llama}\n"
        f"data:\n  train: [{REPO / 'data/domain/train.jsonl'}]\n"
        "cluster:\n  max_nodes: 1\n  cpus_per_node: 2\n  memory_gb: 0.5\n"
        f"output:\n  registry: {tmp_path / 'reg'}\n  storage_path: {tmp_path / 'runs'}\n"
    )
    out = cli("train", str(spec), env=cli_env)
    assert out.returncode != 0
    assert "does NOT fit in 0.5 GiB" in out.stderr
    assert f"{spec}: the plan needs" in out.stderr and "--force" in out.stderr
    assert not (tmp_path / "runs").exists()  # refused before any run started


def test_the_plan_counts_the_evaluation_after_training():
    """An 8B LoRA trains on one 24 GB GPU, but scoring answers of 4,096 tokens against a 128k
    vocabulary does not fit beside the base: the job does not fit, and the advice is to
    evaluate elsewhere."""
    shape = resolve_shape("llama-3-8b")
    p = PlanInput(shape, method="lora", lora_r=8, device_mem_gb=24, eval_tokens=4096)
    result = plan_with_verdict(p)
    assert result.training_fits is True and result.evaluation_fits is False
    assert result.fits is False and result.peak_bytes == result.evaluation_bytes
    # 8 rows scored at a time: bf16 logits, their fp32 copy and the fp32 log-softmax
    assert result.evaluation["scoring_logits"] == 8 * 4096 * shape.vocab * (2 + 4 + 4)
    assert result.evaluation["weights"] == result.per_device["weights"]  # the base, once
    assert result.advice[0]["changes"] == {"eval.domain": None, "eval.general": None}
    assert plan(replace(p, evaluate=False)).fits is True
    assert plan(replace(p, eval_tokens=256)).fits is True
    # full fine-tuning: base and tuned copies, spread over the GPUs of a node
    seventy = resolve_shape("llama-3-70b")
    full = plan(PlanInput(seventy, method="full", gpus=8, nodes=2, device_mem_gb=80))
    assert full.evaluation["base_and_tuned"] == 2 * seventy.total_params * 2 // 8
    assert full.evaluation_fits is True


def test_train_refuses_a_job_whose_evaluation_cannot_fit(tmp_path, cli_env, tiny_llama):
    question = "Which of these does the Quillfeather weigh? " + "257 grams or more, " * 300
    domain = tmp_path / "domain.jsonl"
    domain.write_text(json.dumps({"instruction": question, "output": "x", "answer": "x"}) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: longeval\nmodel:\n  name: {tiny_llama}\n"
        f"data:\n  train: [{REPO / 'data/domain/train.jsonl'}]\n  max_seq_length: 128\n"
        f"eval:\n  domain: {domain}\n  general: null\n"
        "cluster:\n  max_nodes: 1\n  cpus_per_node: 2\n  memory_gb: 6\n"
        f"output:\n  registry: {tmp_path / 'reg'}\n  storage_path: {tmp_path / 'runs'}\n"
    )
    planned = json.loads(cli("plan", str(spec), "--json", env=cli_env).stdout)
    # the question's ~6,000 characters count as ~1,500 tokens a scored row
    assert planned["input"]["eval_tokens"] > len(question) // 4
    assert planned["training_fits"] is True and planned["evaluation_fits"] is False
    out = cli("train", str(spec), env=cli_env)
    assert out.returncode != 0
    assert f"{spec}: training fits, but the evaluation after it needs" in out.stderr
    assert "--no-evaluate" in out.stderr and "ftservice eval" in out.stderr
    assert not (tmp_path / "runs").exists()  # refused before any run started
    without = json.loads(cli("plan", str(spec), "--no-evaluate", "--json", env=cli_env).stdout)
    assert without["fits"] is True and without["evaluation"] == {}


def test_a_70b_qlora_that_misses_48gb_is_advised_nearby_settings_on_one_gpu():
    """The headline case: PEFT's fp32 copy of a 128k vocabulary's embeddings and LM head
    tips 70B QLoRA over one 48 GB GPU; the advice keeps the method and the one GPU."""
    p = PlanInput(resolve_shape("llama-3-70b"), method="qlora", device_mem_gb=48)
    result = plan_with_verdict(p)
    assert result.fits is False
    assert result.per_device["weights_unquantized_fp32"] > 7 * GiB
    first = result.advice[0]
    assert first == {"changes": {"quantization.unquantized_dtype": "bfloat16"},
                     "method": "qlora", "gpus_per_node": 1, "nodes": 1, "offload": "none",
                     "per_device_gib": first["per_device_gib"], "fits": True}  # fmt: skip
    assert first["per_device_gib"] < 48 * 0.95
    again = plan(replace(p, unquantized_dtype="bfloat16"))  # the change, planned: it fits
    assert (
        again.fits
        and again.per_device["weights_unquantized_bf16"] * 2
        == (result.per_device["weights_unquantized_fp32"])
    )
    gpus = [a["gpus_per_node"] * a["nodes"] for a in result.advice]
    assert gpus == sorted(gpus)  # ranked by GPUs used
    # no advice is a superset of a smaller change that already fits
    changes = [{(k, json.dumps(v)) for k, v in a["changes"].items()}
               for a in result.advice if a["method"] == "qlora"]  # fmt: skip
    assert not any(a < b for a in changes for b in changes)
    # every change names a job spec field, and a spec with it applied plans as advised
    spec = load_spec(REPO / "cluster/jobs/llama3-70b-qlora-48gb.yaml")
    for advice in result.advice:
        for path in advice["changes"]:
            section, _, key = path.rpartition(".")
            holder = spec
            for part in filter(None, section.split(".")):
                holder = getattr(holder, part)
            assert hasattr(holder, key), path


def test_the_cli_prints_the_advice_and_plan_json_carries_it(cli_env):
    out = cli("plan", "--model", "llama-3-70b", "--method", "qlora", "--gpus", "1",
              "--gpu-mem", "48", "--json", env=cli_env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    advice = json.loads(out.stdout)["advice"]
    assert advice[0]["method"] == "qlora" and advice[0]["gpus_per_node"] == 1
    text = cli("plan", "--model", "llama-3-70b", "--method", "qlora", "--gpus", "1",
               "--gpu-mem", "48", env=cli_env)  # fmt: skip
    assert "advice, best first" in text.stdout
    assert 'quantization.unquantized_dtype="bfloat16": qlora on 1 GPU(s)' in text.stdout


def test_an_8bit_optimizer_quarters_adamws_state():
    p = PlanInput(resolve_shape("llama-3-8b"), method="full", zero3=False, device_mem_gb=80)
    adamw, paged = plan(p), plan(replace(p, optimizer="paged_adamw_8bit"))
    params = resolve_shape("llama-3-8b").total_params
    assert adamw.per_device["optimizer"] - paged.per_device["optimizer"] == 6 * params
