"""The memory planner against published numbers, row by row, beside `accelerate estimate-memory`.

Three sources, all in one run:
1. Published claims: Llama-3-8B LoRA r=8 on one 24 GB GPU; 70B (and LLaMA-65B, as in the
   QLoRA paper) QLoRA on one 48 GB GPU; 70B full fine-tuning needs ZeRO-3 on 8×80 GB with
   optimizer offload to CPU and does not fit without it.
2. DeepSpeed's own ZeRO-3 model-states estimator, called with the same inputs.
3. LLaMA-Factory's hardware table (README, "Hardware Requirement": GB per GPU by method and
   size), with our plan for a representative model of each size at sequence 512, batch 1,
   gradient checkpointing, LoRA r=16 on every linear layer.
Beside each row: what accelerate's estimator gives for the same model (its `estimate-memory`
functions, on an empty model built from the same shape, since no hub is reachable here).

    .venv/bin/python benchmarks/planner_vs_published.py
"""

from __future__ import annotations

import json
from dataclasses import replace

GB = 1e9

# LLaMA-Factory README, "Hardware Requirement" (GB): method -> size -> GB
LLAMA_FACTORY = {
    "full (bf16 mixed)": {"7B": 120, "14B": 240, "30B": 600, "70B": 1200},
    "lora (16-bit)": {"7B": 16, "14B": 32, "30B": 64, "70B": 160},
    "qlora (4-bit)": {"7B": 6, "14B": 12, "30B": 24, "70B": 48},
}
SIZES = {"7B": "llama-2-7b", "14B": "qwen2.5-14b", "30B": "llama-30b", "70B": "llama-2-70b"}


def accelerate_estimate(shape) -> dict:
    """accelerate estimate-memory's numbers for this shape (bytes): fp32/fp16/int4 load size
    and its peak for full training with Adam in fp32 and bf16 mixed precision."""
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = Qwen2Config if shape.qkv_bias else LlamaConfig
    config = cls(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied_embeddings,
    )  # fmt: skip
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    total, _ = calculate_maximum_sizes(model)
    return {
        "load_fp16": total / 2,
        "load_int4": total / 8,
        "train_adam_fp32": max(estimate_training_usage(total, "float32").values()),
        "train_adam_bf16": max(estimate_training_usage(total, "bfloat16").values()),
    }


def main() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from ftservice.memory import PlanInput, plan, resolve_shape, zero3_model_states

    out: dict = {"claims": [], "deepspeed": [], "llama_factory": []}
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    claims = [
        ("Llama-3-8B LoRA r=8 fits 1×24 GB", True,
         PlanInput(resolve_shape("llama-3-8b"), method="lora", lora_r=8, device_mem_gb=24)),
        ("Llama-3-70B QLoRA fits 1×48 GB", True,
         PlanInput(resolve_shape("llama-3-70b"), method="qlora", lora_targets=attention,
                   seq_len=512, device_mem_gb=48)),
        ("LLaMA-65B QLoRA fits 1×48 GB (QLoRA paper)", True,
         PlanInput(resolve_shape("llama-65b"), method="qlora", lora_targets=attention,
                   seq_len=512, device_mem_gb=48)),
        ("70B full, ZeRO-3 + CPU optimizer offload, fits 8×80 GB", True,
         PlanInput(resolve_shape("llama-3-70b"), method="full", gpus=8, device_mem_gb=80,
                   offload="cpu", cpu_mem_gb=2048)),
        ("70B full, ZeRO-3 without offload, does not fit 8×80 GB", False,
         PlanInput(resolve_shape("llama-3-70b"), method="full", gpus=8, device_mem_gb=80)),
    ]  # fmt: skip
    for text, expected, p in claims:
        r = plan(p)
        out["claims"].append(
            {"claim": text, "planned_gb": r.total_bytes / GB, "fits": r.fits,
             "agrees": r.fits == expected}
        )  # fmt: skip
    for model, gpus, nodes, offload, offload_params in [
        ("llama-3-70b", 8, 1, "none", "none"), ("llama-3-70b", 8, 1, "cpu", "none"),
        ("llama-3-70b", 8, 1, "cpu", "cpu"), ("llama-3-8b", 1, 1, "none", "none"),
        ("qwen2.5-72b", 8, 2, "cpu", "none"),
    ]:  # fmt: skip
        shape = resolve_shape(model)
        p = PlanInput(shape, method="full", gpus=gpus, nodes=nodes, offload=offload,
                      offload_params=offload_params)  # fmt: skip
        ours = zero3_model_states(p)
        theirs = estimate_zero3_model_states_mem_needs(
            shape.total_params, shape.largest_layer_params, num_gpus_per_node=gpus,
            num_nodes=nodes, cpu_offload=offload != "none",
            cpu_offload_params=offload_params != "none",
        )  # fmt: skip
        out["deepspeed"].append(
            {"model": model, "gpus": gpus, "nodes": nodes, "offload": f"{offload}/{offload_params}",
             "ours_gpu_gb": ours[1] / GB, "deepspeed_gpu_gb": theirs[1] / GB,
             "ours_cpu_gb": ours[0] / GB, "deepspeed_cpu_gb": theirs[0] / GB,
             "equal": tuple(ours) == tuple(theirs)}
        )  # fmt: skip
    for size, model in SIZES.items():
        shape = resolve_shape(model)
        acc = accelerate_estimate(shape)
        base = PlanInput(shape, seq_len=512, micro_batch=1)
        rows = {
            "full (bf16 mixed)": (
                replace(base, method="full", zero3=False),
                acc["train_adam_bf16"],
            ),
            "lora (16-bit)": (replace(base, method="lora"), acc["load_fp16"]),
            "qlora (4-bit)": (replace(base, method="qlora"), acc["load_int4"]),
        }
        for method, (p, acc_bytes) in rows.items():
            ours = plan(p).total_bytes / GB
            published = LLAMA_FACTORY[method][size]
            out["llama_factory"].append(
                {"method": method, "size": size, "model": model,
                 "params_b": shape.total_params / 1e9, "published_gb": published,
                 "ours_gb": round(ours, 1), "ours_error": ours / published - 1,
                 "accelerate_gb": round(acc_bytes / GB, 1),
                 "accelerate_error": acc_bytes / GB / published - 1}
            )  # fmt: skip
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
