"""The curation pipeline on a real local Ray: each step on small fixtures, exact counts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ftservice.config import spec_from_dict
from ftservice.data.curate import curate, normalise_text, scrub_pii
from ftservice.data.loaders import DataError

pytestmark = pytest.mark.slow

BASE_FACTS = [
    f"The {name} instrument measures {unit} with a resolution of {i * 7 + 3} units and ships "
    f"from the {city} warehouse every {day} morning."
    for i, (name, unit, city, day) in enumerate(
        zip(
            ["Arlo", "Brisk", "Corvid", "Dune", "Ember", "Fable", "Gale", "Heron", "Iris", "Jade"],
            [
                "pressure",
                "humidity",
                "wind",
                "light",
                "sound",
                "dust",
                "heat",
                "rain",
                "ozone",
                "frost",
            ],
            ["Oslo", "Lima", "Pune", "Kobe", "Cork", "Bonn", "Nice", "Riga", "Graz", "Split"],
            ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"] * 2,
            strict=True,
        )
    )
]
LEAK = (
    "the calibration certificate of every Brindlewood sensor lists the technician "
    "and the bench number"
)


def fixture_rows() -> list[dict]:
    rows = [
        {"id": f"u{i}", "instruction": f"Describe product {i}.", "output": fact}
        for i, fact in enumerate(BASE_FACTS)
    ]
    rows += [
        # exact duplicate once unicode and whitespace are normalised
        {
            "id": "dup-exact",
            "instruction": "Describe  product\u00a00.",
            "output": BASE_FACTS[0] + "  ",
        },
        # near duplicate: one word changed in a long text
        {
            "id": "dup-near",
            "instruction": "Describe product 1.",
            "output": BASE_FACTS[1].replace("ships", "leaves"),
        },
        {"id": "empty", "instruction": "Say nothing.", "output": "   "},
        {
            "id": "leaky",
            "instruction": "Tell me about certificates.",
            "output": f"In short, {LEAK}.",
        },
        {"id": "long", "instruction": "Ramble.", "output": "ramble " * 300},
        {
            "id": "pii",
            "instruction": "Who do I write to?",
            "output": "Mail jo.smith@example.org or call +44 20 7946 0958 from 192.168.10.4 "
            "with key sk-abcdefghijklmnopqrstuvwx.",
        },
    ]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_spec(tmp_path: Path, tiny_llama: Path, train: list[Path], **curate) -> object:
    eval_file = write_jsonl(
        tmp_path / "eval.jsonl", [{"instruction": "Certificates?", "output": f"Yes: {LEAK}."}]
    )
    return spec_from_dict(
        {
            "name": "fixture",
            "model": {"name": str(tiny_llama)},
            "data": {
                "train": [str(p) for p in train],
                "eval": [str(eval_file)],
                "max_seq_length": 128,
                "curate": {"pii": True, "batch_rows": 4, **curate},
            },
            "eval": {"domain": None, "general": None},
        }
    )


def test_each_step_removes_exactly_its_rows(local_ray, tmp_path, tiny_llama):
    train = write_jsonl(tmp_path / "train.jsonl", fixture_rows())
    before = train.read_bytes()
    spec = make_spec(tmp_path, tiny_llama, [train])
    report = curate(spec, output_dir=str(tmp_path / "out"), progress=False)
    steps = {s.step: (s.rows_in, s.removed, s.rows_out) for s in report.steps}
    assert steps == {
        "empty_response": (16, 1, 15),
        "exact_duplicate": (15, 1, 14),
        "near_duplicate": (14, 1, 13),
        "contaminated": (13, 1, 12),
        "too_short": (12, 0, 12),
        "too_long": (12, 1, 11),
    }
    assert report.removed["empty_response"] == ["empty"]
    # which copy of a duplicate pair is kept depends on content, not order; one of each goes
    assert report.removed["exact_duplicate"] in (["dup-exact"], ["u0"])
    assert report.removed["near_duplicate"] in (["dup-near"], ["u1"])
    assert report.removed["contaminated"] == ["leaky"]
    assert report.removed["too_long"] == ["long"]
    assert report.pii == {"email": 1, "api_key": 1, "ip_address": 1, "phone": 1}
    assert train.read_bytes() == before  # input never modified

    out = tmp_path / "out"
    table = pq.read_table(out / "train")
    assert table.num_rows == 11
    pii_row = next(r for r in table.to_pylist() if r["id"] == "pii")
    assert pii_row["messages"][-1]["content"] == (
        "Mail <EMAIL> or call <PHONE> from <IP> with key <SECRET>."
    )
    written = json.loads((out / "report.json").read_text())
    assert written["fingerprint"] == report.fingerprint and written["rows_out"] == 11
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".out-*"))  # no temporary folder left behind


def test_truncate_mode_keeps_long_examples_cut_to_fit(local_ray, tmp_path, tiny_llama):
    train = write_jsonl(tmp_path / "train.jsonl", fixture_rows())
    spec = make_spec(tmp_path, tiny_llama, [train], length={"mode": "truncate"})
    report = curate(spec, output_dir=str(tmp_path / "out"), progress=False)
    assert report.removed["too_long"] == []
    assert report.token_lengths["max"] <= 128


def test_split_is_stable_when_the_input_is_reordered(local_ray, tmp_path, tiny_llama):
    rows = [
        {
            "id": f"r{i}",
            "instruction": f"Question number {i}?",
            "output": f"Answer {i}: " + "x" * (i % 13),
        }
        for i in range(200)
    ]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    (tmp_path / "b").mkdir()
    half = len(shuffled) // 2
    parts = [
        write_jsonl(tmp_path / "b" / "p1.jsonl", shuffled[half:]),
        write_jsonl(tmp_path / "b" / "p2.jsonl", shuffled[:half]),
    ]
    settings = {"eval_fraction": 0.2, "near_dedup": {"enabled": False}, "pii": False}
    one = curate(
        make_spec(tmp_path, tiny_llama, [first], **settings), str(tmp_path / "o1"), progress=False
    )
    two = curate(
        make_spec(tmp_path, tiny_llama, parts, **settings), str(tmp_path / "o2"), progress=False
    )
    assert one.fingerprint == two.fingerprint
    ids = {
        d: {
            split: sorted(pq.read_table(tmp_path / d / split).column("id").to_pylist())
            for split in ("train", "eval")
        }
        for d in ("o1", "o2")
    }
    assert ids["o1"] == ids["o2"]
    assert 20 <= len(ids["o1"]["eval"]) <= 60  # about 20% of 200


def test_a_dataset_that_curation_empties_says_which_step(local_ray, tmp_path, tiny_llama):
    train = write_jsonl(
        tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": " "} for i in range(3)]
    )
    with pytest.raises(DataError) as err:
        curate(make_spec(tmp_path, tiny_llama, [train]), str(tmp_path / "out"), progress=False)
    msg = str(err.value)
    assert "'empty_response'" in msg and "3 of 3" in msg, msg
    assert "data.curate" in msg and train.name in msg, msg  # the file, and where to fix it
    assert not (tmp_path / "out").exists()


def test_bad_record_inside_a_ray_task_surfaces_with_file_and_line(local_ray, tmp_path, tiny_llama):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n{broken\n")
    with pytest.raises(DataError) as err:
        curate(make_spec(tmp_path, tiny_llama, [train]), str(tmp_path / "out"), progress=False)
    assert str(err.value).startswith(f"{train}:2: not valid JSON")


def test_text_normalisation_and_pii_helpers():
    assert normalise_text("  Ａ\u00a0b\t\tc \r\n\r\n\r\n\r\nd\x07  ") == "A b c\n\nd"
    counts = {"email": 0, "api_key": 0, "ip_address": 0, "phone": 0}
    assert (
        scrub_pii("version 1.2.3 costs 40 euros in 2024", counts)
        == "version 1.2.3 costs 40 euros in 2024"
    )
    assert counts == {"email": 0, "api_key": 0, "ip_address": 0, "phone": 0}


def test_cli_curates_the_shipped_domain_data(tmp_path, cli_env):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = cli_env
    out = tmp_path / "curated"
    result = subprocess.run(
        [sys.executable, "-m", "ftservice", "data", "curate", "cluster/jobs/quickstart.yaml",
         "--output", str(out)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == 228
    assert report["rows_out"] == pq.read_table(out / "train").num_rows
    assert f"fingerprint: {report['fingerprint']}" in result.stdout
    assert report["steps"][0] == {"step": "empty_response", "in": 228, "out": 228, "removed": 0}
