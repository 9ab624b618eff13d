"""SFT throughput: `ftservice train` against a plain TRL SFTTrainer script, in one run.

Both train LoRA (r=16, alpha 32, all linear layers) on the built-in SmolLM2-135M-Instruct
over one epoch of the shipped domain set, max length 256, 2 threads, same system prompt.
The peers are TRL's documented quick start with its default settings (padding to the longest
example of each batch, no packing, batch 8, bf16 autocast, gradient checkpointing) and the
same script configured as our spec is (packing, micro-batch 2, no checkpointing); ours is
the quickstart spec through Ray Train, with each of issue 18's levers alone and together,
and in-process. Useful tokens are
the non-pad tokens each one trained on (TRL's own `num_tokens` count); time is the HF
Trainer's `train_runtime` (the training loop, no start-up). Model FLOPs utilisation counts
the matmuls a LoRA step needs (forward 2·N, input gradients 2·N, per token, N = matmul
weights incl. the tied LM head) plus attention, against the matmul peak of this machine
measured in the same run.

    .venv/bin/python benchmarks/sft_throughput.py [--epochs 1] [--runs NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import json_output

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "cluster/jobs/quickstart.yaml"
# the quickstart's SFT alone: its replay and KL-to-base term (benchmarks/forgetting.py) are
# left out, so that the peers train on the same data with the same loss
PLAIN_SFT = ["data.replay=null", "train.kl_to_base=0"]
THREADS = 2


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """Best GFLOP/s of an n×n matmul on THREADS threads."""
    import torch

    torch.set_num_threads(THREADS)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def flops_per_token(model_path: str, seq_len: float) -> float:
    """Model FLOPs of one LoRA training token (no recomputation counted)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    h, i, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h // c.num_attention_heads * c.num_key_value_heads
    matmul = layers * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * v
    attention = layers * 2 * 2 * h * seq_len  # QK^T and AV per token, causal half ignored
    return 2 * (2 * matmul + 2 * attention)  # forward + gradients w.r.t. inputs


def peer(model_path: str, out: str, epochs: float, our_settings: bool) -> dict:
    """TRL's quick start on the same data and LoRA settings: its defaults, or (our_settings)
    configured as the quickstart spec is (packing, micro-batch, no checkpointing, warm-up)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ftservice.config import load_spec
    from ftservice.data.loaders import load_rows

    torch.set_num_threads(THREADS)
    spec = load_spec(SPEC, PLAIN_SFT)
    rows = load_rows(spec.data.train, system_prompt=spec.data.system_prompt)
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    ours = {
        "packing": True,
        "packing_strategy": "bfd",
        "per_device_train_batch_size": spec.train.micro_batch_size,
        "gradient_checkpointing": False,
        "warmup_steps": spec.train.warmup_ratio,
    }
    trainer = SFTTrainer(
        model=model_path,
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=out,
            max_length=spec.data.max_seq_length,
            num_train_epochs=epochs,
            learning_rate=spec.train.learning_rate,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            **(ours if our_settings else {}),
        ),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
    )
    trainer.train()
    return summarise(trainer.state.log_history)


def summarise(log_history: list[dict]) -> dict:
    tokens = max(h.get("num_tokens", 0) for h in log_history)
    runtime = next(h["train_runtime"] for h in log_history if "train_runtime" in h)
    steps = max(h.get("step", 0) for h in log_history)
    return {
        "tokens": tokens,
        "seconds": runtime,
        "steps": steps,
        "tokens_per_s": tokens / runtime,
        "first_loss": next(h["loss"] for h in log_history if "loss" in h),
        "last_loss": [h["loss"] for h in log_history if "loss" in h][-1],
    }


def ours(tmp: Path, epochs: float, overrides: list[str]) -> dict:
    """`ftservice train` of the quickstart spec for `epochs`, with `overrides`."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="ftb-", dir="/tmp"),
    }
    env.pop("RAY_ADDRESS", None)
    registry = tempfile.mkdtemp(dir=tmp)
    cmd = [
        sys.executable, "-m", "ftservice", "train", str(SPEC), "--no-evaluate", "--json",
        f"train.epochs={epochs}", f"output.registry={registry}",
        f"output.storage_path={tmp / 'runs'}", "checkpoint.every_steps=100000", *PLAIN_SFT,
        *overrides,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    artifact = Path(json_output(done.stdout)["artifact"])
    return summarise(json.loads((artifact / "log_history.json").read_text()))


BEFORE = ["train.label_only_head=false", "train.attention=sdpa"]  # the recipe before issue 18
RUNS = {
    # name: (what, how)
    "trl_defaults": ("TRL `SFTTrainer` defaults (in-process)", "peer"),
    "trl_our_settings": ("TRL `SFTTrainer`, our settings (in-process)", "peer-ours"),
    "before": ("ftservice before: TRL's head, SDPA over packed rows (Ray)", BEFORE),
    "label_only_head": ("  + label-only LM head alone (Ray)", ["train.attention=sdpa"]),
    "documents": ("  + per-document attention alone (Ray)", ["train.label_only_head=false"]),
    "ftservice": ("ftservice train, both (Ray Train, 1 worker)", []),
    "ftservice_local": ("ftservice train, both (in-process)", ["scaling.num_workers=0"]),
}


def run(name: str, tmp: Path, epochs: float) -> dict:
    how = RUNS[name][1]
    if isinstance(how, list):
        return ours(tmp, epochs, how)
    done = subprocess.run(
        [sys.executable, __file__, "--epochs", str(epochs), "--peer-only", str(tmp), how],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    base = results["trl_defaults"]["tokens_per_s"]
    lines = [
        "| | useful tokens | seconds | tokens/s | × TRL defaults | MFU (bf16 peak) | last loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {RUNS[name][0]} | {r['tokens']:,.0f} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}× | "
            f"{r['mfu_bf16_peak']:.1%} | {r['last_loss']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--runs", nargs="*", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--peer-only", nargs=2, metavar=("OUT", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from ftservice.config import ModelSpec
    from ftservice.models import resolve_model

    model_path = str(resolve_model(ModelSpec(name="smollm2-135m-instruct")).path)
    if args.peer_only:
        out, how = args.peer_only
        print(json.dumps(peer(model_path, out, args.epochs, our_settings=how == "peer-ours")))
        return
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            results[name] = run(name, Path(tmp), args.epochs)
            r = results[name]
            flops = flops_per_token(model_path, seq_len=128) * r["tokens_per_s"]
            r["model_gflops"] = flops / 1e9
            r["mfu_bf16_peak"] = flops / 1e9 / peaks["bfloat16"]
            print(f"{name}: {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    ratios = {}
    if "trl_defaults" in results:
        base = results["trl_defaults"]["tokens_per_s"]
        ratios = {f"{k}_over_trl_defaults": v["tokens_per_s"] / base for k, v in results.items()}
    if "trl_our_settings" in results and "ftservice" in results:
        ratios["ftservice_over_trl_our_settings"] = (
            results["ftservice"]["tokens_per_s"] / results["trl_our_settings"]["tokens_per_s"]
        )
    print(json.dumps({"matmul_peak_gflops": peaks, "runs": results, "ratios": ratios}, indent=2))
    if "trl_defaults" in results:
        print(table(results))


if __name__ == "__main__":
    main()
