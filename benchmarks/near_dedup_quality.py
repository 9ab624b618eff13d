"""Near-duplicate removal quality of `ftservice data curate` on planted near-duplicates.

Makes N unique examples (random words, 20-60 per answer) and plants P near-duplicates, each a
copy of a unique example with one small edit (a word replaced, deleted, inserted or swapped
with its neighbour, or a change of case and punctuation). Runs the real pipeline (Ray Data,
MinHash LSH) at several thresholds and, as the reference, exact dedup alone. Prints JSON:
recall of planted pairs and the share of unique examples removed. Goal: recall >= 95% with
<= 1% of unique examples removed.

    .venv/bin/python benchmarks/near_dedup_quality.py [--unique 10000 --planted 500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

VOCAB_SEED = 11


def vocabulary(rng: random.Random, n: int = 3000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randrange(3, 9))) for _ in range(n)]


def edit(words: list[str], rng: random.Random, vocab: list[str]) -> tuple[list[str], str]:
    words = list(words)
    kind = rng.choice(["replace", "delete", "insert", "swap", "case_punct"])
    i = rng.randrange(1, len(words) - 1)
    if kind == "replace":
        words[i] = rng.choice(vocab)
    elif kind == "delete":
        del words[i]
    elif kind == "insert":
        words.insert(i, rng.choice(vocab))
    elif kind == "swap":
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        words[0] = words[0].capitalize()
        words[-1] += "!"
    return words, kind


def build(n_unique: int, n_planted: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = vocabulary(random.Random(VOCAB_SEED))
    rows, answers = [], []
    for i in range(n_unique):
        words = rng.choices(vocab, k=rng.randrange(20, 61))
        answers.append(words)
        rows.append(
            {"id": f"u{i}", "instruction": f"Tell me about item {i}.", "output": " ".join(words)}
        )
    pairs = []
    for j, i in enumerate(rng.sample(range(n_unique), n_planted)):
        words, kind = edit(answers[i], rng, vocab)
        rows.append(
            {"id": f"p{j}", "instruction": f"Tell me about item {i}.", "output": " ".join(words)}
        )
        pairs.append((f"u{i}", f"p{j}", kind))
    rng.shuffle(rows)
    return rows, pairs


def score(report: dict, pairs, n_unique: int) -> dict:
    removed = {rid for ids in report["removed"].values() for rid in ids}
    caught = [(a in removed) != (b in removed) for a, b, _ in pairs]
    by_kind: dict[str, list[bool]] = {}
    for (_, _, kind), hit in zip(pairs, caught, strict=True):
        by_kind.setdefault(kind, []).append(hit)
    planted_originals = {a for a, _, _ in pairs}
    others = [f"u{i}" for i in range(n_unique) if f"u{i}" not in planted_originals]
    wrongly = sum(1 for rid in others if rid in removed)
    return {
        "recall": round(sum(caught) / len(pairs), 4),
        "recall_by_edit": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
        "unique_removed": round(wrongly / len(others), 5),
        "unique_removed_count": wrongly,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unique", type=int, default=10_000)
    parser.add_argument("--planted", type=int, default=500)
    parser.add_argument("--thresholds", default="0.8,0.85,0.9")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ftservice.config import spec_from_dict
    from ftservice.data.curate import curate
    from ftservice.raycluster import init_ray

    rows, pairs = build(args.unique, args.planted)
    init_ray()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs = {"exact_only": {"near_dedup": {"enabled": False}}}
        for t in args.thresholds.split(","):
            runs[f"minhash_{t}"] = {"near_dedup": {"threshold": float(t)}}
        for name, settings in runs.items():
            spec = spec_from_dict(
                {
                    "name": "neardup",
                    "model": {"name": "smollm2-135m-instruct"},
                    "data": {
                        "train": [str(train)],
                        "curate": {"decontaminate": {"enabled": False}, **settings},
                    },
                    "eval": {"domain": None, "general": None},
                }
            )
            report = curate(spec, output_dir=str(Path(tmp) / name), progress=False).model_dump(
                by_alias=True
            )
            results[name] = score(report, pairs, args.unique)
    print(
        json.dumps({"unique": args.unique, "planted": args.planted, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
