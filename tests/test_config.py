"""Job specs: good specs resolve; every bad case names file, field path and line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftservice.config import JobSpec, SpecError, dump_spec, load_spec

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "cluster" / "jobs" / "quickstart.yaml"


def write(tmp_path: Path, text: str, model: bool = True) -> Path:
    """A spec file; the required base model is added at the end (lines above stay put)."""
    path = tmp_path / "job.yaml"
    path.write_text(text + ("model:\n  name: smollm2-135m-instruct\n" if model else ""))
    return path


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as err:
        load_spec(path, overrides)
    return [p.render(str(path)) for p in err.value.problems]


def test_quickstart_resolves_with_defaults_filled_in():
    spec = load_spec(QUICKSTART)
    assert spec.name == "quickstart"
    assert spec.method == "lora" and spec.stage == "sft"
    assert spec.lora.r == 16
    assert spec.train.learning_rate == pytest.approx(1e-3)
    assert spec.checkpoint.num_to_keep == 2  # a default, not in the file
    # the dump is itself a valid spec that resolves to the same thing
    again = JobSpec.model_validate(__import__("yaml").safe_load(dump_spec(spec)))
    assert again == spec


def test_overrides_set_nested_values_with_yaml_types(tmp_path):
    path = write(tmp_path, "name: a\n")
    spec = load_spec(path, ["train.learning_rate=1e-4", "lora.r=8", "data.train=[x.jsonl]"])
    assert spec.train.learning_rate == pytest.approx(1e-4)
    assert spec.lora.r == 8
    assert spec.data.train == ["x.jsonl"]


def test_unknown_key_suggests_the_near_miss_with_line(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  learning_rate: 1.0e-4\n  epoch: 3\n")
    [msg] = problems(path)
    assert msg == f"{path}:4: train.epoch: unknown key 'epoch'; did you mean 'epochs'?"


def test_unknown_key_without_near_miss_lists_valid_keys(tmp_path):
    path = write(tmp_path, "name: a\nzzz: 1\n")
    [msg] = problems(path)
    assert msg.startswith(f"{path}:2: zzz: unknown key 'zzz'; valid keys: name, stage, method")


def test_lora_fields_with_full_method(tmp_path):
    path = write(tmp_path, "name: a\nmethod: full\nlora:\n  r: 8\n")
    [msg] = problems(path)
    assert msg.startswith(f"{path}:3: lora: "), msg
    assert "method is 'full'" in msg, msg
    assert "lora section" in msg and "method: lora" in msg, msg  # the fix, both ways


def test_qlora_with_zero3_explains_and_suggests_single_gpu_workers(tmp_path):
    path = write(
        tmp_path,
        "name: a\nmethod: qlora\nscaling:\n  deepspeed:\n    stage: 3\n",
    )
    [msg] = problems(path)
    assert msg.startswith(f"{path}:5: scaling.deepspeed.stage: "), msg
    assert "ZeRO-3" in msg, msg
    assert "gpus_per_worker: 1" in msg and "no deepspeed section" in msg, msg


def test_non_positive_learning_rate(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  learning_rate: 0\n")
    [msg] = problems(path)
    assert msg == f"{path}:3: train.learning_rate: Input should be greater than 0 (got 0)"


def test_more_workers_than_the_cluster_can_ever_give(tmp_path):
    path = write(
        tmp_path,
        "name: a\nscaling:\n  num_workers: 20\n  use_gpu: true\n"
        "cluster:\n  max_nodes: 2\n  gpus_per_node: 8\n",
    )
    [msg] = problems(path)
    assert msg.startswith(f"{path}:3: scaling.num_workers: "), msg
    assert "20 GPUs" in msg and re.search(r"\b16\b", msg), msg
    assert "lower num_workers" in msg and "cluster.max_nodes" in msg, msg


def test_local_target_checks_this_machines_cpus(tmp_path):
    import os

    path = write(tmp_path, "name: a\nscaling:\n  num_workers: 1\n  cpus_per_worker: 4096\n")
    [msg] = problems(path)
    assert f"but a node has only {os.cpu_count()}" in msg


def test_every_problem_is_reported_together(tmp_path):
    path = write(
        tmp_path,
        "name: Bad_Name\nmethod: qlora\nmodel:\n  nme: x\ntrain:\n  learning_rate: -1\n"
        "scaling:\n  deepspeed:\n    stage: 3\n",
        model=False,
    )
    found = problems(path)
    assert [m.split(": ")[1] for m in found] == [
        "name",
        "model.name",
        "model.nme",
        "train.learning_rate",
        "scaling.deepspeed.stage",
    ]
    lines = [int(m.split(":")[1]) for m in found]
    assert lines == [1, 3, 4, 6, 9]


def test_override_errors_point_at_the_command_line(tmp_path):
    path = write(tmp_path, "name: a\n")
    [msg] = problems(path, ["lora.rr=3"])
    assert msg == "command-line override 'lora.rr=3': lora.rr: unknown key 'rr'; did you mean 'r'?"


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(SpecError, match="is not KEY=VALUE"):
        load_spec(write(tmp_path, "name: a\n"), ["lora.r"])
    path = write(tmp_path, "name: a\ntrain: [1,\n", model=False)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "not valid YAML" in str(err.value) and err.value.problems[0].line == 3


def test_a_spec_without_a_base_model_is_refused_with_the_field_and_line(tmp_path):
    [msg] = problems(write(tmp_path, "name: a\n", model=False))
    assert msg.startswith(f"{tmp_path / 'job.yaml'}: model.name: "), msg  # no line: key absent
    assert "required" in msg and "smollm2-135m-instruct" in msg and ".gguf" in msg, msg
    found = problems(write(tmp_path, "name: a\nmodel: {}\nmethod: full\nlora: {r: 4}\n", False))
    assert found[0].startswith(f"{tmp_path / 'job.yaml'}:2: model.name: required")
    assert any("method is 'full'" in p for p in found)  # the other checks still ran


def test_validate_reports_every_missing_input_with_its_field_and_line(tmp_path):
    (tmp_path / "here.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    path = write(
        tmp_path,
        "name: a\n"
        "data:\n"
        f"  train: [{tmp_path / 'here.jsonl'}, {tmp_path / 'gone.jsonl'}]\n"
        f"  eval: [{tmp_path / 'held-out'}]\n"
        "eval:\n"
        f"  domain: {tmp_path / 'domain.jsonl'}\n"
        "  general: null\n"
        "stage: dpo\n"
        "dpo:\n"
        "  parent: no-such-artifact\n"
        f"output:\n  registry: {tmp_path / 'registry'}\n",
    )
    load_spec(path)  # the shape is fine: only reading the inputs finds the problems
    with pytest.raises(SpecError) as err:
        load_spec(path, check_inputs=True)
    found = {p.path: p.line for p in err.value.problems}
    assert found == {"data.train.1": 3, "data.eval.0": 4, "eval.domain": 6, "dpo.parent": 10}
    text = str(err.value)
    assert f"'{tmp_path / 'gone.jsonl'}' does not exist" in text
    assert "no artifact 'no-such-artifact'" in text and str(tmp_path / "registry") in text
    result = subprocess.run(
        [sys.executable, "-m", "ftservice", "validate", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "4 problems in" in result.stderr


def test_every_field_has_a_description():
    schema = JobSpec.model_json_schema()
    missing = [
        f"{name}.{field}"
        for name, definition in [("JobSpec", schema), *schema["$defs"].items()]
        for field, prop in definition.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert missing == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ftservice", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_validate_prints_resolved_spec_or_all_errors(tmp_path):
    ok = run_cli("validate", str(QUICKSTART), "train.max_steps=7")
    assert ok.returncode == 0, ok.stderr
    assert "max_steps: 7" in ok.stdout and "valid" in ok.stdout
    bad = write(tmp_path, "name: a\ntrain:\n  epoch: 1\n  learning_rate: 0\n")
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert f"{bad}:3: train.epoch" in result.stderr
    assert f"{bad}:4: train.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_schema_is_json_schema_for_editors():
    result = run_cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "JobSpec"
    assert schema["additionalProperties"] is False
    assert schema["properties"]["method"]["enum"] == ["lora", "qlora", "full"]


def test_a_dumped_resolved_spec_loads_again(tmp_path):
    spec = load_spec(QUICKSTART)
    again = write(tmp_path, dump_spec(spec))
    assert load_spec(again) == spec


@pytest.mark.parametrize(
    ("text", "field", "line", "parts"),
    [
        ("method: lora\nscaling:\n  deepspeed:\n    stage: 2\n", "scaling.deepspeed", 4,
         ["method is 'lora'", "remove the scaling.deepspeed section"]),
        ("method: qlora\nscaling:\n  deepspeed:\n    stage: 1\n", "scaling.deepspeed", 4,
         ["method is 'qlora'", "remove the scaling.deepspeed section"]),
        ("stage: dpo\ndata:\n  packing: true\n", "data.packing", 4,
         ["stage is 'dpo'", "remove data.packing"]),
        ("stage: dpo\ndata:\n  completion_only_loss: false\n", "data.completion_only_loss", 4,
         ["stage is 'dpo'", "remove data.completion_only_loss"]),
        ("train:\n  warmup_ratio: 1.0\n", "train.warmup_ratio", 3,
         ["step count", "below 1"]),
        ("train:\n  attention: documents\n", "train.attention", 3,
         ["data.packing is off", "set data.packing: true"]),
    ],
)  # fmt: skip
def test_a_field_training_would_ignore_is_refused(tmp_path, text, field, line, parts):
    path = write(tmp_path, "name: a\n" + text)
    [msg] = problems(path)
    assert msg.startswith(f"{path}:{line}: {field}: "), msg
    for part in parts:
        assert part in msg, msg


def test_a_resolved_dpo_spec_with_default_data_fields_is_not_refused(tmp_path):
    path = write(tmp_path, "name: a\nstage: dpo\n")
    spec = load_spec(path)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_spec(spec))  # completion_only_loss: true and packing: false in it
    assert load_spec(dumped) == spec


def test_selecting_on_the_held_out_domain_set_is_refused_unless_asked_for(tmp_path):
    path = write(
        tmp_path,
        "name: a\ndata:\n  eval: [data/domain/eval.jsonl]\n"
        "eval:\n  domain: data/domain/eval.jsonl\n",
    )
    [msg] = problems(path)
    assert msg.startswith(f"{path}:3: data.eval: ")
    assert "held-out domain set" in msg and "data/domain/valid.jsonl" in msg
    assert "eval.allow_selection_on_domain: true" in msg
    spec = load_spec(path, ["eval.allow_selection_on_domain=true"])
    assert spec.data.eval == ["data/domain/eval.jsonl"]
    # the same file under another spelling is the same file
    other = load_spec(path, ["data.eval=[./data/../data/domain/valid.jsonl]"])
    assert other.data.eval == ["./data/../data/domain/valid.jsonl"]
    with pytest.raises(SpecError):
        load_spec(path, ["data.eval=[./data/../data/domain/eval.jsonl]"])


def test_a_cpu_worker_runs_the_threads_the_spec_gives_it(tmp_path):
    from ftservice.train.common import cpu_threads

    assert cpu_threads(load_spec(write(tmp_path, "name: a\nscaling:\n  cpus_per_worker: 2\n"))) == 2
    spec = load_spec(write(tmp_path, "name: a\nscaling:\n  threads_per_worker: 2\n"))
    assert spec.scaling.cpus_per_worker == 1 and cpu_threads(spec) == 2


def test_a_serve_spec_refuses_job_defaults_the_api_does_not_set(tmp_path):
    from ftservice.serve.spec import load_serve_spec

    path = tmp_path / "serve.yaml"
    path.write_text(
        "name: api\nmodel:\n  name: smollm2-135m-instruct\njobs:\n  defaults:\n"
        "    scaling.use_gpu: true\n    output.registry: /elsewhere\n"
    )
    with pytest.raises(SpecError) as e:
        load_serve_spec(path)
    [problem] = e.value.problems
    msg = problem.render(str(path))
    assert msg.startswith(f"{path}:") and "jobs.defaults.output.registry" in msg, msg
    assert "train.*" in msg and "scaling.*" in msg, msg  # what may be set instead
