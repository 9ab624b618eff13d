"""`ftservice data curate` against a plain `datasets` script doing the same work, in one run.

Work: normalise, drop empty, exact dedup, token-length filter with the built-in model's chat
template, hash split (5% eval), Parquet out; on N synthetic examples (5% exact duplicates,
1% empty, 2% too long). Prints JSON with both timings, peak memory (PSS of the process tree,
Ray workers and object store included) and the ratios.

    .venv/bin/python benchmarks/curate_throughput.py [--n 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(5000)]


def synthetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        r = rng.random()
        if r < 0.05 and rows:
            rows.append(dict(rows[rng.randrange(len(rows))]))  # exact duplicate
            continue
        length = 400 if r > 0.98 else rng.randrange(8, 40)  # ~2% far over max_tokens
        rows.append(
            {
                "instruction": f"Question {i}: "
                + " ".join(rng.choices(WORDS, k=rng.randrange(4, 16))),
                "output": "" if 0.05 <= r < 0.06 else " ".join(rng.choices(WORDS, k=length)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    from ftservice.config import ModelSpec
    from ftservice.models import cache_dir, resolve_model

    tokenizer_dir = str(resolve_model(ModelSpec(name="smollm2-135m-instruct")).path)
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = tmp / "train.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in synthetic(args.n)))
        spec = tmp / "job.yaml"
        spec.write_text(
            f"name: bench\ndata:\n  train: [{train}]\n  max_seq_length: 256\n  curate:\n"
            "    near_dedup: {enabled: false}\n    decontaminate: {enabled: false}\n"
            "    pii: false\n    eval_fraction: 0.05\n    batch_rows: 2048\n"
            "eval: {domain: null, general: null}\n"
        )
        env = {
            **os.environ,
            "HOME": str(tmp),
            "FTSERVICE_CACHE": str(cache_dir()),  # the converted built-in model, as users have it
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        env.pop("RAY_ADDRESS", None)
        ours = measure(
            [
                python,
                "-m",
                "ftservice",
                "data",
                "curate",
                str(spec),
                "--output",
                str(tmp / "ours"),
                "--json",
            ],
            env=env,
            cwd=str(REPO),
        )
        stdout = ours.pop("stdout")
        report = json.loads(stdout[stdout.index("{\n") :])  # Ray may print before the JSON
        (tmp / "peer").mkdir()
        peer = measure(
            [
                python,
                str(REPO / "benchmarks" / "curate_baseline_datasets.py"),
                str(train),
                tokenizer_dir,
                "256",
                str(tmp / "peer"),
            ],
            env=env,
            cwd=str(REPO),
        )
        peer_counts = json.loads(peer.pop("stdout").strip().splitlines()[-1])
    assert report["split"] == peer_counts, (report["split"], peer_counts)  # same work, same result
    result = {
        "examples": args.n,
        "kept": report["split"],
        "ftservice": ours | {"examples_per_s": round(args.n / ours["seconds"], 1)},
        "datasets": peer | {"examples_per_s": round(args.n / peer["seconds"], 1)},
        "throughput_ratio": round(peer["seconds"] / ours["seconds"], 2),
        "peak_memory_ratio": round(ours["peak_mib"] / peer["peak_mib"], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
