"""Formats recognised and normalised (golden examples); loaders; every bad input's message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftservice.data.formats import recognise, to_openai_dpo, to_trl
from ftservice.data.loaders import DataError, check_files, expand, iter_examples

REPO = Path(__file__).resolve().parents[1]

USER_ASSISTANT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
GOLDEN = [
    (
        "alpaca",
        {"instruction": "Summarise:", "input": "A long text.", "output": "Short."},
        {
            "kind": "chat",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Summarise:\n\nA long text."},
                {"role": "assistant", "content": "Short."},
            ],
        },
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "What is 2+2?"},
                {"from": "gpt", "value": "4"},
            ]
        },
        {"kind": "chat", "messages": [{"role": "system", "content": "Be brief."}, *USER_ASSISTANT]},
    ),
    (
        "openai",
        {"messages": [{"role": "system", "content": "Own system."}, *USER_ASSISTANT]},
        {
            "kind": "chat",
            "messages": [{"role": "system", "content": "Own system."}, *USER_ASSISTANT],
        },
    ),
    (
        "text",
        {"text": "Raw corpus text."},
        {"kind": "text", "messages": [], "text": "Raw corpus text."},
    ),
    (
        "preference",
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {
            "kind": "preference",
            "messages": [{"role": "system", "content": "Be brief."}, USER_ASSISTANT[0]],
            "chosen": "4",
            "rejected": "5",
        },
    ),
    (
        "preference",
        {
            "prompt": [USER_ASSISTANT[0]],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {
            "kind": "preference",
            "messages": [{"role": "system", "content": "Be brief."}, USER_ASSISTANT[0]],
            "chosen": "4",
            "rejected": "5",
        },
    ),
    (
        "openai_dpo",
        {
            "input": {"messages": [USER_ASSISTANT[0]]},
            "preferred_output": [{"role": "assistant", "content": "4"}],
            "non_preferred_output": [{"role": "assistant", "content": "5"}],
        },
        {
            "kind": "preference",
            "messages": [{"role": "system", "content": "Be brief."}, USER_ASSISTANT[0]],
            "chosen": "4",
            "rejected": "5",
        },
    ),
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    ("fmt", "record", "expected"), GOLDEN, ids=[g[0] + str(i) for i, g in enumerate(GOLDEN)]
)
def test_each_format_is_recognised_and_normalised(tmp_path, fmt, record, expected):
    assert recognise(record) == fmt
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    [(loc, seen, row)] = list(iter_examples(path, system_prompt="Be brief."))
    assert seen == fmt and loc.line == 1
    assert row["id"] == "d.jsonl:1"
    assert {k: row[k] for k in expected} == expected


def test_preference_rows_export_to_trl_and_openai_dpo_forms(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "x", "prompt": "Q?", "chosen": "A", "rejected": "B"}]
    )
    [(_, _, row)] = list(iter_examples(path))
    assert to_trl(row) == {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    }
    assert to_openai_dpo(row) == {
        "input": {"messages": [{"role": "user", "content": "Q?"}]},
        "preferred_output": [{"role": "assistant", "content": "A"}],
        "non_preferred_output": [{"role": "assistant", "content": "B"}],
    }


RECORDS = [
    {"id": f"r{i}", "instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(5)
]


def test_every_file_kind_loads_the_same_rows(tmp_path):
    import datasets

    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    (tmp_path / "b.json").write_text(json.dumps(RECORDS, indent=2))
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(
        "id,instruction,output\n"
        + "".join(f"{r['id']},{r['instruction']},{r['output']}\n" for r in RECORDS)
    )
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "e_saved"))
    files = expand([tmp_path])
    assert [f.name for f in files] == ["a.jsonl", "b.json", "c.csv", "d.parquet", "e_saved"]
    for f in files:
        rows = [row for _, _, row in iter_examples(f)]
        assert [r["id"] for r in rows] == [r["id"] for r in RECORDS], f
        assert rows[3]["messages"][1]["content"] == "Answer 3."


def test_json_array_lines_are_reported(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    lines = [loc.line for loc, _, _ in iter_examples(path)]
    assert lines == [2, 7, 12, 17, 22]  # the line where each element starts


def test_large_json_array_streams_across_chunks(tmp_path):
    from ftservice.data import loaders

    records = [{"id": f"r{i}", "text": "é" * (i % 7) + "x" * 300} for i in range(9000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert path.stat().st_size > 2 * loaders.CHUNK
    rows = [row for _, _, row in iter_examples(path)]
    assert [r["text"] for r in rows] == [r["text"] for r in records]


def error_of(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as err:
        list(iter_examples(path, fmt))
    return str(err.value)


def test_line_that_is_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:2: "), msg
    assert "not valid JSON" in msg and "column 2" in msg and "one JSON object" in msg, msg


def test_record_missing_a_field_names_format_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [RECORDS[0], {"id": "z", "instruction": "No answer"}])
    msg = error_of(path)
    assert msg.startswith(f"{path}:2: "), msg
    assert "'output'" in msg and "alpaca" in msg and "instruction, output" in msg, msg


def test_file_mixing_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "mix.jsonl", [RECORDS[0], RECORDS[1], {"messages": USER_ASSISTANT}]
    )
    msg = error_of(path)
    assert f"{path}:1" in msg and f"{path}:3" in msg, msg
    assert "alpaca" in msg and "openai" in msg and "data.format" in msg, msg


def test_text_that_is_not_utf8_gives_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = (json.dumps(RECORDS[0]) + "\n").encode()
    path.write_bytes(first + b'{"text": "caf' + b"\xe9" + b'"}\n')
    offset = len(first) + len('{"text": "caf')
    msg = error_of(path)
    assert msg.startswith(f"{path}:2: "), msg
    assert f"byte offset {offset}" in msg and "UTF-8" in msg, msg


def test_empty_file_and_unknown_record(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    msg = error_of(empty)
    assert msg.startswith(f"{empty}: ") and "is empty" in msg and "record" in msg, msg
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "reply": "!"}])
    msg = error_of(odd)
    assert msg.startswith(f"{odd}:1: ") and "question, reply" in msg, msg
    assert "alpaca: instruction, output" in msg, msg  # the fix: the formats and their fields


def test_named_format_is_checked_on_every_record(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": USER_ASSISTANT}])
    msg = error_of(path, "alpaca")
    assert msg.startswith(f"{path}:1: ") and "alpaca" in msg, msg
    assert "'instruction'" in msg and "'output'" in msg, msg


def test_bad_roles_and_missing_assistant(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    msg = error_of(path)
    assert msg.startswith(f"{path}:1: ") and "messages[0].role" in msg and "'robot'" in msg, msg
    assert all(role in msg for role in ("assistant", "system", "user")), msg
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    msg = error_of(path)
    assert msg.startswith(f"{path}:1: ") and "assistant turn" in msg, msg
    # a conversation ending in a user turn is a prompt, unless the spec says it is chat data
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [USER_ASSISTANT[0]]}])
    msg = error_of(path, "openai")
    assert msg.startswith(f"{path}:1: ") and "assistant turn" in msg and "openai" in msg, msg


def test_input_files_are_never_modified(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    before = path.read_bytes()
    check_files([str(path)])
    assert path.read_bytes() == before


def test_shipped_generators_reproduce_the_shipped_files_byte_for_byte():
    result = subprocess.run(
        [sys.executable, str(REPO / "data" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_shipped_datasets_have_the_documented_shape():
    summary = {
        Path(r["file"]).name: r
        for r in check_files([str(REPO / "data" / "domain"), str(REPO / "data" / "preference")])
    }
    assert summary["train.jsonl"]["records"] == 228 and summary["eval.jsonl"]["records"] == 76
    assert summary["seeds.jsonl"]["format"] == "preference"
    train = [json.loads(x) for x in (REPO / "data/domain/train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (REPO / "data/domain/eval.jsonl").read_text().splitlines()]
    # held-out phrasings are never used in training
    assert not {e["instruction"] for e in evals} & {t["instruction"] for t in train}
    # the loop's campaign questions are none of the others, and ask every fact twice
    assert summary["asked.jsonl"]["records"] == 152
    asked = [json.loads(x) for x in (REPO / "data/domain/asked.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (REPO / "data/domain/valid.jsonl").read_text().splitlines()]
    others = {r["instruction"] for r in train + evals + valid}
    assert (
        len({a["instruction"] for a in asked}) == 152
        and not {a["instruction"] for a in asked} & others
    )
    assert sorted(a["answer"] for a in asked) == sorted(e["answer"] for e in evals for _ in (1, 2))
    general = (REPO / "data/general/prompts.jsonl").read_text().splitlines()
    assert len(general) >= 100


def normalised(prompt: str) -> str:
    """Case, spacing, punctuation and numbers folded: what makes two prompts the same."""
    import re

    folded = re.sub(r"\d+(?:[.,]\d+)?", "0", prompt.lower())
    return " ".join(re.sub(r"[^\w\s]", " ", folded).split())


def test_the_three_general_prompt_sets_share_no_prompt_even_normalised():
    sets = {
        name: [json.loads(x)["instruction"] for x in
               (REPO / f"data/general/{name}.jsonl").read_text().splitlines()]
        for name in ("prompts", "replay", "valid")
    }  # fmt: skip
    assert [len(sets[n]) for n in ("prompts", "replay", "valid")] == [110, 160, 55]
    folded = {name: {normalised(p) for p in prompts} for name, prompts in sets.items()}
    for name, prompts in sets.items():
        assert len(folded[name]) == len(prompts), f"{name} repeats a prompt"
    assert not folded["prompts"] & folded["replay"]
    assert not folded["prompts"] & folded["valid"]
    assert not folded["replay"] & folded["valid"]
    # the check itself folds what it should: a held-out prompt in other case, spacing and
    # numbers is caught
    held_out = sets["prompts"][0]
    assert normalised("  " + held_out.upper().replace(" ", "   ") + " ") in folded["prompts"]
    assert normalised("Give me 3 tips for saving money.") == normalised(
        "give me 7 TIPS for saving money"
    )


def test_preference_seeds_follow_the_written_rule():
    from ftservice.data.preference_rule import prefers

    seeds = [json.loads(x) for x in (REPO / "data/preference/seeds.jsonl").read_text().splitlines()]
    assert seeds and all(prefers(s["chosen"], s["rejected"]) == 0 for s in seeds)
    assert all(prefers(s["rejected"], s["chosen"]) == 1 for s in seeds)


def test_cli_data_check_and_show(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    run = [sys.executable, "-m", "ftservice", "data"]
    checked = subprocess.run([*run, "check", str(path), "--json"], capture_output=True, text=True)
    assert json.loads(checked.stdout)[0] | {"file": ""} == {
        "file": "",
        "format": "alpaca",
        "records": 5,
        "kinds": "chat 5",
        "turns": 2.0,
        "response_chars": 9.0,
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    failed = subprocess.run([*run, "check", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.startswith(f"error: {bad}:1: not valid JSON")


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_memory_is_bounded_by_the_chunk_not_the_file(tmp_path, kind):
    import tracemalloc

    records = [{"id": f"r{i}", "text": f"{i} " + "y" * 500} for i in range(40_000)]
    path = tmp_path / f"big.{kind}"
    if kind == "jsonl":
        write_jsonl(path, records)
    else:
        path.write_text(json.dumps(records))
    assert path.stat().st_size > 20 * 2**20
    tracemalloc.start()
    count = sum(1 for _ in iter_examples(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 40_000
    assert peak < 8 * 2**20  # a few MiB of buffers, not the 20+ MiB file
