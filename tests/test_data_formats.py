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
    assert error_of(path) == (
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes at "
        "column 2); each line of a JSONL file must be one JSON object"
    )


def test_record_missing_a_field_names_format_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [RECORDS[0], {"id": "z", "instruction": "No answer"}])
    assert error_of(path) == (
        f"{path}:2: record in the alpaca format lacks 'output'; alpaca records need "
        "instruction, output (optional: input, system) (format alpaca, recognised)"
    )


def test_file_mixing_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "mix.jsonl", [RECORDS[0], RECORDS[1], {"messages": USER_ASSISTANT}]
    )
    assert error_of(path) == (
        f"{path} mixes formats: {path}:1 is alpaca but {path}:3 is openai; put each format in "
        "its own file (or name the format with data.format)"
    )


def test_text_that_is_not_utf8_gives_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = (json.dumps(RECORDS[0]) + "\n").encode()
    path.write_bytes(first + b'{"text": "caf' + b"\xe9" + b'"}\n')
    offset = len(first) + len('{"text": "caf')
    assert (
        error_of(path)
        == f"{path}:2: not UTF-8 text (byte offset {offset}); re-save the file as UTF-8"
    )


def test_empty_file_and_unknown_record(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert error_of(empty) == f"{empty}: file is empty; it needs at least one record"
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "reply": "!"}])
    assert error_of(odd).startswith(
        f"{odd}:1: record fits no known format (its keys: question, reply)"
    )


def test_named_format_is_checked_on_every_record(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": USER_ASSISTANT}])
    assert "record in the alpaca format lacks 'instruction', 'output'" in error_of(path, "alpaca")


def test_bad_roles_and_missing_assistant(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    assert "'messages[0].role' is 'robot'; use one of assistant, system, user" in error_of(path)
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    assert "conversation has no assistant turn to learn from" in error_of(path)
    # a conversation ending in a user turn is a prompt, unless the spec says it is chat data
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [USER_ASSISTANT[0]]}])
    assert "conversation has no assistant turn to learn from" in error_of(path, "openai")


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
    general = (REPO / "data/general/prompts.jsonl").read_text().splitlines()
    assert len(general) >= 100


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
