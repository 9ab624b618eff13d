"""The memory planner against measured peaks of real runs on this machine, in one run.

Each case is a short real `ftservice train` of the built-in SmolLM2-135M (packed 256-token
rows, so every micro-batch is as long as the plan assumes) on the embedded Ray: LoRA SFT,
QLoRA SFT, full SFT under ZeRO-3 (1 worker), LoRA DPO. The measured peak is the training
worker's own peak resident memory (`ru_maxrss`, reported in the artifact's metrics); the
estimate is `ftservice plan` of the same spec. With `--evaluate`, each run is then evaluated
(the shipped domain and general sets) and the evaluation task's own peak (a fresh process)
is set against the plan's evaluation. Goal: every error within ±15%.

    .venv/bin/python benchmarks/planner_accuracy.py [--steps 4] [--evaluate]
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
MiB = 2**20

BASE = {
    "model": {"name": "smollm2-135m-instruct"},
    "data": {
        "train": ["data/domain/train.jsonl"],
        "system_prompt": "You answer questions about Brindlewood Instruments.",
        "max_seq_length": 256,
        "packing": True,
    },
    "train": {"micro_batch_size": 4, "learning_rate": 1e-4},
    "scaling": {"num_workers": 1, "cpus_per_worker": 2},
    "eval": {"domain": None, "general": None},
}
EVAL = {
    "domain": "data/domain/eval.jsonl",
    "general": "data/general/prompts.jsonl",
    "max_new_tokens": 32,
}
CASES = {
    "lora_sft": {"method": "lora"},
    "qlora_sft": {"method": "qlora"},
    "full_sft_zero3": {
        "method": "full",
        "train": {"micro_batch_size": 2},
        "scaling": {"deepspeed": {"stage": 3}},
    },
    "lora_dpo": {
        "method": "lora",
        "stage": "dpo",
        # the pairs are ~100 tokens: a max length near that makes padded rows as long as planned
        "data": {"train": ["data/preference/seeds.jsonl"], "packing": False, "max_seq_length": 112},
        "train": {"micro_batch_size": 4},
    },
}


def merged(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--evaluate", action="store_true", help="measure the evaluation too")
    args = parser.parse_args()
    from ftservice.config import spec_from_dict
    from ftservice.memory import plan_for_spec

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ftb-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        for case in args.cases:
            spec = merged(BASE, CASES[case]) | {"name": case.replace("_", "-")}
            spec["output"] = {"registry": str(tmp / "reg"), "storage_path": str(tmp / "runs")}
            if args.evaluate:
                spec["eval"] = EVAL
            planned = plan_for_spec(spec_from_dict(spec))
            spec_file = tmp / f"{case}.yaml"
            spec_file.write_text(json.dumps(spec))  # JSON is YAML
            done = subprocess.run(
                [sys.executable, "-m", "ftservice", "train", str(spec_file), "--json",
                 "--max-steps", str(args.steps),
                 "--evaluate" if args.evaluate else "--no-evaluate"],
                capture_output=True, text=True, env=env, cwd=REPO,
            )  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            metrics = json_output(done.stdout)["metrics"]
            measured = metrics["peak_memory_rank0"]["rss_bytes"]
            rows[case] = {
                "planned_mib": round(planned.total_bytes / MiB),
                "measured_mib": round(measured / MiB),
                "error": planned.total_bytes / measured - 1,
                "breakdown_mib": {k: round(v / MiB) for k, v in planned.per_device.items()},
            }
            print(f"{case}: {rows[case]}", file=sys.stderr)
            if args.evaluate:
                peak = metrics["evaluation"]["memory"]["process_max_rss_bytes"]
                rows[f"{case}_evaluation"] = {
                    "planned_mib": round(planned.evaluation_bytes / MiB),
                    "measured_mib": round(peak / MiB),
                    "error": planned.evaluation_bytes / peak - 1,
                    "breakdown_mib": {k: round(v / MiB) for k, v in planned.evaluation.items()},
                }
                print(f"{case} evaluation: {rows[f'{case}_evaluation']}", file=sys.stderr)
    worst = max(abs(r["error"]) for r in rows.values())
    print(json.dumps({"cases": rows, "worst_abs_error": worst}, indent=2))


if __name__ == "__main__":
    main()
