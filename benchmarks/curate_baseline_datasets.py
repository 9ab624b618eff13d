"""The peer: a plain Hugging Face `datasets` script doing the same curation work as
`ftservice data curate` with near-dedup, decontamination and PII off:
normalise, drop empty, exact dedup, token-length filter (chat template), hash split, Parquet.

    python benchmarks/curate_baseline_datasets.py TRAIN.jsonl TOKENIZER_DIR MAX_TOKENS OUT
"""

from __future__ import annotations

import hashlib
import json
import sys

from datasets import load_dataset
from transformers import AutoTokenizer

from ftservice.data.curate import normalise_text, split_of


def main() -> None:
    train, tokenizer_dir, max_tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = load_dataset("json", data_files=train, split="train")

    def prepare(row):
        messages = [
            {"role": "user", "content": normalise_text(row["instruction"])},
            {"role": "assistant", "content": normalise_text(row["output"])},
        ]
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        return {
            "messages": messages,
            "content_hash": hashlib.sha256(text.encode()).hexdigest(),
            "n_tokens": len(ids),
        }

    ds = ds.map(prepare, remove_columns=["instruction", "output"])
    ds = ds.filter(lambda r: bool(r["messages"][1]["content"].strip()))
    seen: set[str] = set()

    def first_copy(row):
        if row["content_hash"] in seen:
            return False
        seen.add(row["content_hash"])
        return True

    ds = ds.filter(first_copy)
    ds = ds.filter(lambda r: 1 <= r["n_tokens"] <= max_tokens)
    ds = ds.map(lambda r: {"split": split_of(r["content_hash"], 0.05, 0)})
    counts = {}
    for split in ("train", "eval"):
        part = ds.filter(lambda r, s=split: r["split"] == s)
        part.to_parquet(f"{out}/{split}.parquet")
        counts[split] = len(part)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
