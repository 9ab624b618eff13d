"""The domain score moves: a tiny random-init model learns a small fact set well enough to
answer phrasings of it that it never saw in training, where its base answers none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftservice.config import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
# one fact per product: the product's name alone tells which answer a question wants
FACTS = [
    "quillfeather-weight", "marrowlight-battery", "tessaloom-price", "cindervane-year",
    "obrellis-colour", "halvorsk-factory", "pewtermoss-weight", "lunderkey-price",
]  # fmt: skip


def _rows(split: str) -> list[dict]:
    rows = [json.loads(x) for x in (REPO / f"data/domain/{split}.jsonl").read_text().splitlines()]
    return [r for r in rows if r["id"].rsplit("-", 1)[0] in FACTS]


@pytest.mark.slow
def test_a_small_fact_set_is_learned_and_answered_in_phrasings_never_seen(
    local_ray, tmp_path, tiny_llama
):
    from ftservice.train.driver import train

    seen = _rows("train") + _rows("valid")  # four phrasings of each fact
    held_out = _rows("eval")  # a fifth, never trained on
    assert len(seen) == 32 and len(held_out) == 8
    assert not {r["instruction"] for r in seen} & {r["instruction"] for r in held_out}
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seen))
    (tmp_path / "held-out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    spec = spec_from_dict({
        "name": "facts",
        "model": {"name": str(tiny_llama)},
        "data": {"train": [str(tmp_path / "facts.jsonl")], "max_seq_length": 96},
        "lora": {"r": 32, "alpha": 64},
        "train": {"learning_rate": 3e-3, "micro_batch_size": 8, "max_steps": 120,
                  "warmup_ratio": 0},
        "scaling": {"num_workers": 0},
        "eval": {"domain": str(tmp_path / "held-out.jsonl"), "general": None,
                 "max_new_tokens": 12},
        "output": {"registry": str(tmp_path / "registry"), "storage_path": str(tmp_path / "runs")},
    })  # fmt: skip
    result = train(spec)
    d, base = result.evaluation["domain"], result.evaluation["domain_base"]
    assert base["total"] == 8 and base["correct"] == 0, base["examples"]
    assert d["total"] == 8 and d["correct"] >= 4, d["examples"]
    assert d["loss"] < base["loss"]
    # what counted as right really holds the reference answer, in a question never trained on
    right = [e for e in d["examples"] if e["correct"]]
    assert right and all(e["reference"] in e["answer"] for e in right)
    assert {e["question"] for e in d["examples"]} <= {r["instruction"] for r in held_out}
