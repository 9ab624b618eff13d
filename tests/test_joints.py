"""The joints between stages, proven through the real CLI: curated data trains, a DPO stage
starts from that artifact, and eval, export, lineage and the registry commands read what
the stages wrote. Also: portable adapters, typed hand-offs, and an import graph that is a
DAG."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftservice.artifacts import (
    CARD,
    META,
    ArtifactMeta,
    BaseModelRef,
    list_artifacts,
    load_artifact,
    publish,
)
from ftservice.config import spec_from_dict
from ftservice.data.loaders import DataError
from ftservice.records import HandoffError
from ftservice.train.common import TrainHistory

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ftservice"


def cli(env: dict, cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "ftservice", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def json_out(done: subprocess.CompletedProcess):
    return json.loads(done.stdout[done.stdout.index("{\n") :])  # Ray may print before it


def write_yaml(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return path


@pytest.mark.slow
def test_curate_train_dpo_eval_export_lineage_through_the_cli(tmp_path, cli_env, tiny_llama):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    lines = (REPO / "data/domain/train.jsonl").read_text().splitlines()[:40]
    # two exact duplicates (under their own ids) for curation to remove
    dups = [json.dumps(json.loads(x) | {"id": f"dup-{i}"}) for i, x in enumerate(lines[:2])]
    (project / "data/train.jsonl").write_text("\n".join([*lines, *dups]) + "\n")
    held_out = (REPO / "data/domain/eval.jsonl").read_text().splitlines()[:3]
    (project / "data/eval.jsonl").write_text("\n".join(held_out) + "\n")
    general = (REPO / "data/general/prompts.jsonl").read_text().splitlines()[:3]
    (project / "data/general.jsonl").write_text("\n".join(general) + "\n")
    prefs = (REPO / "data/preference/seeds.jsonl").read_text().splitlines()[:16]
    (project / "data/prefs.jsonl").write_text("\n".join(prefs) + "\n")
    common = {
        "model": {"name": str(tiny_llama)},
        "lora": {"r": 4, "alpha": 8},
        "checkpoint": {"every_steps": 4, "num_to_keep": 1},
        "eval": {"domain": "data/eval.jsonl", "general": "data/general.jsonl",
                 "max_new_tokens": 4},
        "output": {"registry": "registry", "storage_path": "runs"},
    }  # fmt: skip
    train = {"learning_rate": 5e-3, "micro_batch_size": 8, "max_steps": 4, "warmup_ratio": 0}

    # 1. curate: exact duplicates out, a fifth split off for eval
    curate_spec = write_yaml(
        project / "curate.yaml",
        common | {"name": "domain", "data": {
            "train": ["data/train.jsonl"], "max_seq_length": 96,
            "curate": {"eval_fraction": 0.2, "near_dedup": {"enabled": False},
                       "decontaminate": {"enabled": False}}}},
    )  # fmt: skip
    cli(cli_env, project, "data", "curate", str(curate_spec), "--json")
    report = json.loads((project / "curated/domain/report.json").read_text())
    assert report["rows_in"] == 42 and report["rows_out"] == 40
    assert report["split"]["eval"] > 0

    # 2. SFT on the curated folder: its train split, its eval split held out
    sft_spec = write_yaml(
        project / "sft.yaml",
        common | {"name": "sft", "train": train, "data": {
            "train": ["curated/domain"], "eval": ["curated/domain"], "max_seq_length": 96}},
    )  # fmt: skip
    cli(cli_env, project, "validate", str(sft_spec))
    sft = json_out(cli(cli_env, project, "train", str(sft_spec), "--json", "--no-evaluate"))
    sft_meta = ArtifactMeta.read(project / "registry/sft" / META)
    assert sft_meta.dataset_fingerprint == report["fingerprint"]  # the curated dataset's own
    assert [(d.path, d.kind, d.fingerprint) for d in sft_meta.data] == [
        ("curated/domain", "curated", report["fingerprint"])
    ]
    assert sft_meta.metrics["last_loss"] < sft_meta.metrics["first_loss"]
    assert sft["name"] == "sft"

    # 3. DPO from that artifact
    dpo_spec = write_yaml(
        project / "dpo.yaml",
        common | {"name": "dpo", "stage": "dpo", "train": train | {"learning_rate": 2e-3},
                  "data": {"train": ["data/prefs.jsonl"], "max_seq_length": 96},
                  "dpo": {"parent": "sft"}},
    )  # fmt: skip
    cli(cli_env, project, "train", str(dpo_spec), "--json", "--no-evaluate")
    dpo_meta = ArtifactMeta.read(project / "registry/dpo" / META)
    assert dpo_meta.parent == "sft"
    assert dpo_meta.base_model.fingerprint == sft_meta.base_model.fingerprint

    # 4. eval writes the evaluation into the artifact and its model card
    evaluation = json_out(cli(cli_env, project, "eval", "dpo", "--registry", "registry",
                              "--json"))  # fmt: skip
    assert evaluation["domain"]["total"] == 3 and evaluation["forgetting"]["prompts"] == 3
    dpo = load_artifact("dpo", project / "registry")
    assert dpo.meta.metrics["evaluation"] == evaluation
    card = (dpo.path / CARD).read_text()
    assert "held-out domain score" in card and "More Information Needed" not in card

    # 5. export --merge: the merged model's logits are base + adapter's
    cli(cli_env, project, "export", "dpo", "--merge", "merged", "--registry", "registry")
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        # PEFT finds the base from adapter_config.json alone (the folder it records)
        adapted = AutoPeftModelForCausalLM.from_pretrained(dpo.path)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(project / "merged")(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4)
    assert not torch.allclose(
        adapted, AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits, atol=1e-4
    )  # the adapter does something

    # nothing pickled is published: safetensors and JSON only
    published = list((project / "registry").rglob("*"))
    assert {p.suffix for p in published if p.is_file()} <= {".safetensors", ".json", ".md",
                                                           ".png", ".jinja", ".txt"}  # fmt: skip

    # 6. the registry commands
    chain = json_out(cli(cli_env, project, "artifacts", "lineage", "dpo", "--registry",
                         "registry", "--json"))  # fmt: skip
    assert [step["name"] for step in chain["chain"]] == ["sft", "dpo"]
    assert chain["base"]["load_as"] == str(tiny_llama.resolve())
    assert chain["chain"][1]["metric"].startswith("domain score")
    shown = json_out(cli(cli_env, project, "artifacts", "show", "sft", "--registry", "registry",
                         "--json"))  # fmt: skip
    assert shown["dataset_fingerprint"] == report["fingerprint"]
    assert shown["base_model"]["fingerprint"] == sft_meta.base_model.fingerprint
    text = cli(cli_env, project, "artifacts", "show", "dpo", "--registry", "registry").stdout
    assert "parent: sft" in text and "domain score:" in text
    listed = json.loads(cli(cli_env, project, "artifacts", "list", "registry", "--json").stdout)
    assert {(a["name"], a["parent"]) for a in listed} == {("sft", "-"), ("dpo", "sft")}
    refused = cli(cli_env, project, "artifacts", "rm", "sft", "--registry", "registry", ok=False)
    assert refused.returncode == 1 and "sft is the parent of dpo" in refused.stderr
    cli(cli_env, project, "artifacts", "rm", "dpo", "--registry", "registry")
    cli(cli_env, project, "artifacts", "rm", "sft", "--registry", "registry")
    assert sorted(p.name for p in (project / "registry").iterdir()) == []


def written_adapter(folder: Path, base_path: Path) -> Path:
    """An adapter as training leaves it, made by writing weights (no training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_path),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)  # records the cache folder it was loaded from, and a card
    return folder


def test_an_artifact_names_its_base_as_users_load_it_and_carries_a_real_card(
    tmp_path, builtin_model
):
    from peft import PeftModel

    from ftservice.models import load_causal_lm, portable_name, resolve_model

    weights = written_adapter(tmp_path / "w", builtin_model.path)
    assert "More Information Needed" in (weights / CARD).read_text()  # PEFT's template
    (weights / "training_args.bin").write_bytes(b"pickle")
    spec = spec_from_dict({"name": "x", "model": {"name": "smollm2-135m-instruct"}})
    base = BaseModelRef(
        name="smollm2-135m-instruct", fingerprint=builtin_model.fingerprint, kind="builtin",
        load_as=portable_name(builtin_model), path=str(builtin_model.path),
    )  # fmt: skip
    args = dict(
        spec=spec.model_dump(mode="json"), run_name="r", base_model=base,
        dataset_fingerprint="d" * 64, data=[], metrics={"global_step": 3}, log_history=[],
    )  # fmt: skip
    with pytest.raises(Exception, match=r"pickle files \(training_args.bin\)"):
        publish(tmp_path / "registry", "x", weights, **args)
    (weights / "training_args.bin").unlink()
    artifact = publish(tmp_path / "registry", "x", weights, **args)

    config = json.loads((artifact.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert str(builtin_model.path) not in (artifact.path / "adapter_config.json").read_text()
    card = (artifact.path / CARD).read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "dequantized from the GGUF" in card and builtin_model.fingerprint[:16] in card
    assert "| LoRA rank r | 16 |" in card and "More Information Needed" not in card
    assert "AutoPeftModelForCausalLM" in card and "vllm serve" in card
    assert not [p for p in artifact.path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    # the recorded base resolves through ftservice's resolver, and the adapter loads on it
    resolved = resolve_model(spec.model.model_copy(update={"name": artifact.meta.base_model.name}))
    assert resolved.fingerprint == artifact.meta.base_model.fingerprint
    model = PeftModel.from_pretrained(load_causal_lm(resolved), artifact.path)
    assert "default" in model.peft_config


def test_an_artifact_of_format_version_1_loads_and_an_unknown_version_is_refused(tmp_path):
    v1 = {
        "format_version": 1, "name": "old", "run_name": "old-abc", "spec": {"method": "lora"},
        "base_model": {"name": "m", "fingerprint": "0" * 64, "kind": "builtin"},
        "dataset_fingerprint": "f" * 64, "metrics": {}, "parent": None,
        "created": "2026-11-01T00:00:00Z",
    }  # fmt: skip
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / META).write_text(json.dumps(v1))
    old = load_artifact("old", tmp_path)
    assert (
        old.meta.format_version == 2 and old.meta.data == [] and old.meta.base_model.load_as is None
    )
    (tmp_path / "old" / META).write_text(json.dumps(v1 | {"format_version": 9}))
    with pytest.raises(HandoffError, match=r"ftservice.json: format version 9, but this "):
        load_artifact("old", tmp_path)
    assert list_artifacts(tmp_path) == []  # listing skips it (saying why) instead of failing
    (tmp_path / "old" / META).write_text(json.dumps(v1 | {"metrix": {}}))
    with pytest.raises(HandoffError, match=r"old/ftservice.json: not a valid ArtifactMeta.*metrix"):
        load_artifact("old", tmp_path)


def test_a_hand_off_missing_a_key_fails_at_the_boundary_naming_the_file(tmp_path):
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"format_version": 1, "global_step": 3}))
    with pytest.raises(HandoffError) as err:
        TrainHistory.read(history)
    assert str(err.value).startswith(f"{history}: not a valid TrainHistory")
    assert "log_history: Field required" in str(err.value)


def test_prompt_sets_are_prompts_and_training_refuses_them_with_the_reason(tmp_path, tiny_llama):
    from ftservice.data.loaders import check_files
    from ftservice.evaluate import load_prompts
    from ftservice.train.driver import check_data

    [row] = check_files([str(REPO / "data/general/prompts.jsonl")])
    assert (row["format"], row["kinds"]) == ("prompts", "prompt 110")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "system", "content": "s"},
                                 {"role": "user", "content": "hi?"}]}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "and?"}]}) + "\n"
    )  # fmt: skip
    assert check_files([str(chat)])[0]["format"] == "prompts"
    assert load_prompts(str(chat), "sys") == [
        [{"role": "system", "content": "s"}, {"role": "user", "content": "hi?"}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "and?"}],
    ]
    spec = spec_from_dict(
        {"name": "p", "model": {"name": str(tiny_llama)},
         "data": {"train": [str(REPO / "data/general/prompts.jsonl")]}}
    )  # fmt: skip
    with pytest.raises(DataError) as err:
        check_data(spec)
    msg = str(err.value)
    assert msg.startswith("data.train: ") and "110 of 110" in msg and "prompt" in msg, msg
    assert "eval.general" in msg, msg  # the fix: where prompt sets belong


def test_data_show_prints_the_chat_template_applied(tmp_path, tiny_llama):
    done = subprocess.run(
        [sys.executable, "-m", "ftservice", "data", "show", str(REPO / "data/domain/train.jsonl"),
         "--n", "1", "--model", str(tiny_llama), "--system-prompt", "Be brief."],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = json.loads((REPO / "data/domain/train.jsonl").read_text().splitlines()[0])
    assert (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{first['instruction']}"
        f"<|im_end|>\n<|im_start|>assistant\n{first['output']}<|im_end|>"
    ) in done.stdout


def _ftservice_imports(tree: ast.Module) -> tuple[set[str], list[int]]:
    """Modules of ftservice imported at the top, and lines of ftservice imports elsewhere."""
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftservice"):
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names if a.name.startswith("ftservice")}
        else:
            continue
        if names and node in tree.body:
            top |= names
        elif names:
            nested.append(node.lineno)
    return top, nested


def test_imports_form_a_dag_with_every_import_at_the_top():
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    graph, nested = {}, {}
    for name, path in modules.items():
        top, lines = _ftservice_imports(ast.parse(path.read_text()))
        graph[name] = {m for m in top if m in modules and m != name}
        # the CLI imports per command, for start-up; the vLLM deployment's methods run in the
        # vLLM environment, which has only Ray and the backend they import there
        if lines and name not in ("ftservice.cli", "ftservice.serve.vllm"):
            nested[name] = lines
    assert nested == {}
    done, visiting = set(), []

    def visit(node):
        assert node not in visiting, f"import cycle: {' -> '.join([*visiting, node])}"
        if node in done:
            return
        visiting.append(node)
        for dep in graph[node]:
            visit(dep)
        visiting.pop()
        done.add(node)

    for name in graph:
        visit(name)
    assert "ftservice.sweep" not in graph["ftservice.asha"]  # the rung key is the scheduler's

    def reach(name: str) -> set[str]:
        out, todo = set(), [name]
        while todo:
            for dep in graph[todo.pop()] - out:
                out.add(dep)
                todo.append(dep)
        return out

    # training does not import the curation pipeline (and so Ray Data) for its helpers
    assert "ftservice.data.curate" not in reach("ftservice.train.worker")
    assert "ftservice.data.curate" not in reach("ftservice.train.driver")
