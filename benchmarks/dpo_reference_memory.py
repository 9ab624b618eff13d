"""DPO memory: our adapter reference against a separate reference model copy, in one run.

The same DPO LoRA step on the built-in SmolLM2-135M and the shipped preference pairs, each
in its own process with 2 threads: ours (the policy is a PEFT model and the reference is a
frozen copy of its adapter on the same base, `ftservice.train.dpo`) against the common
recipe that passes TRL's DPOTrainer a second copy of the base as `ref_model`. The adapter
starts at B = 0, so both references are the same function and the loss curves must match.
Memory: what the models hold before the first step (resident memory after building the
trainer, above the process's baseline after imports), what training adds at its peak, and
the peak itself.

    .venv/bin/python benchmarks/dpo_reference_memory.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(variant: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from ftservice.config import spec_from_dict
    from ftservice.data.loaders import load_rows
    from ftservice.models import build_model, load_causal_lm, load_tokenizer, resolve_model
    from ftservice.train import dpo

    spec = spec_from_dict(
        {
            "name": "dpo-mem",
            "model": {"name": "smollm2-135m-instruct"},
            "stage": "dpo",
            "method": "lora",
            "data": {"train": ["data/preference/seeds.jsonl"], "max_seq_length": 256},
            "train": {"micro_batch_size": 4, "learning_rate": 5e-4, "max_steps": steps,
                      "warmup_ratio": 0, "logging_steps": 1},
            "checkpoint": {"every_steps": 10_000},
            "eval": {"domain": None, "general": None},
        }
    )  # fmt: skip
    model_ref = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_ref)
    baseline = rss_now()
    work = tempfile.mkdtemp()
    if variant == "ours":
        trainer = dpo.dpo_trainer(spec, model_ref, None, tokenizer, work, steps, [])
    else:
        from transformers import set_seed
        from trl import DPOTrainer

        set_seed(spec.train.seed)
        policy = build_model(spec, model_ref)
        reference = load_causal_lm(model_ref, dtype=policy.get_base_model().dtype).eval()
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=dpo.dpo_config(spec, work, steps, False),
            train_dataset=dpo.preference_dataset(load_rows(spec.data.train)),
            processing_class=tokenizer,
        )
    held = rss_now() - baseline  # models (and the tokenised data) before the first step
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "held_mib": held / MiB,
        "peak_mib": peak / MiB,
        "added_mib": (peak - baseline) / MiB,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run(args.variant, args.steps)))
        return
    results = {}
    for variant in ("ours", "separate_reference_copy"):
        done = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        results[variant] = json.loads(line.removeprefix("RESULT "))
    ours, peer = results["ours"], results["separate_reference_copy"]
    diffs = [abs(a - b) for a, b in zip(ours["losses"], peer["losses"], strict=True)]
    print(
        json.dumps(
            results
            | {
                "held_by_models_ratio": ours["held_mib"] / peer["held_mib"],
                "added_memory_ratio": ours["added_mib"] / peer["added_mib"],
                "peak_ratio": ours["peak_mib"] / peer["peak_mib"],
                "max_loss_difference": max(diffs),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
