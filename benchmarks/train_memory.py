"""Training memory on the built-in model, measured in one run.

1. Bytes of the frozen base: the same SmolLM2-135M loaded in fp32, in bf16, and in 4-bit NF4
   with double quantisation as QLoRA loads it (packed weights, quantisation constants and
   the layers left unquantised: embeddings, norms).
2. ZeRO-3 partitioning: the parameter elements each rank holds for full fine-tuning under
   DeepSpeed ZeRO-3 with 2 workers against 1 (gloo on CPU), from the run's own report.
3. Peak resident memory of the training worker per method (LoRA, QLoRA, full under ZeRO-3
   on 1 worker): a few real steps of `ftservice train` each.

    .venv/bin/python benchmarks/train_memory.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import json_output

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "cluster/jobs/quickstart.yaml"
MiB = 2**20


def tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer, and of bitsandbytes' quantisation state."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                x = getattr(state, name, None)
                if x is not None and hasattr(x, "numel"):
                    total += x.numel() * x.element_size()
            state = getattr(state, "state2", None)
    return total


def base_bytes() -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftservice.config import ModelSpec
    from ftservice.models import resolve_model

    path = resolve_model(ModelSpec(name="smollm2-135m-instruct")).path
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = tensor_bytes(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map="cpu", dtype=torch.bfloat16
    )
    out["qlora_nf4_double_quant"] = tensor_bytes(model)
    return out


def train(tmp: Path, steps: int, name: str, *overrides: str, full: bool = False) -> dict:
    """Metrics of a short `ftservice train` of the quickstart spec (full: without its lora)."""
    import yaml

    spec = yaml.safe_load(SPEC.read_text())
    spec["data"].pop("replay", None)  # the SFT alone (replay and its KL term left out)
    spec["train"].pop("kl_to_base", None)
    if full:
        spec.pop("lora")
        spec["method"] = "full"
        spec["train"]["micro_batch_size"] = 1
    spec_file = tmp / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "ftservice", "train", str(spec_file), "--no-evaluate", "--json",
        "--max-steps", str(steps), f"name={name}", f"output.registry={tmp / 'artifacts'}",
        f"output.storage_path={tmp / 'runs'}", *overrides,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json_output(done.stdout)["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    result: dict = {"base_bytes": base_bytes()}
    b = result["base_bytes"]
    result["base_ratios"] = {
        "qlora_vs_bf16": b["qlora_nf4_double_quant"] / b["bf16"],
        "qlora_vs_fp32": b["qlora_nf4_double_quant"] / b["fp32"],
    }
    with tempfile.TemporaryDirectory(prefix="ftb-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        runs = {
            "lora": train(tmp, args.steps, "mem-lora"),
            "qlora": train(tmp, args.steps, "mem-qlora", "method=qlora"),
            "full_zero3_1_worker": train(
                tmp, args.steps, "mem-full1", "scaling.cpus_per_worker=2", full=True
            ),
            "full_zero3_2_workers": train(
                tmp,
                args.steps,
                "mem-full2",
                "scaling.num_workers=2",
                "scaling.cpus_per_worker=1",
                full=True,
            ),
        }
    result["peak_rss_mib"] = {k: m["peak_memory_rank0"]["rss_bytes"] / MiB for k, m in runs.items()}
    one, two = runs["full_zero3_1_worker"]["partition"], runs["full_zero3_2_workers"]["partition"]
    result["zero3_partition"] = {
        "1_worker_local_params": one["parameters_local"],
        "2_workers_local_params": two["parameters_local"],
        "total_params": two["parameters_total"],
        "per_rank_ratio_2_vs_1": two["parameters_local"] / one["parameters_local"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
