"""The `ftservice` command: a thin dispatch table over the package's modules."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ftservice import __version__
from ftservice.errors import FtserviceError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune open LLMs for a domain on Ray, and close the loop with people.",
)
models_app = typer.Typer(no_args_is_help=True, help="Base models: built-in, local, hub.")
app.add_typer(models_app, name="models")
data_app = typer.Typer(no_args_is_help=True, help="Check, show and curate training data.")
app.add_typer(data_app, name="data")
artifacts_app = typer.Typer(no_args_is_help=True, help="See and tidy a registry of artifacts.")
app.add_typer(artifacts_app, name="artifacts")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service (in its store).")
app.add_typer(keys_app, name="keys")
feedback_app = typer.Typer(
    no_args_is_help=True, help="Preference campaigns: annotators, leaderboard, export, backup."
)
app.add_typer(feedback_app, name="feedback")
annotators_app = typer.Typer(no_args_is_help=True, help="Who may vote in a campaign.")
feedback_app.add_typer(annotators_app, name="annotators")
serve_app = typer.Typer(no_args_is_help=True, help="Serve a base and its adapters on Ray Serve.")
app.add_typer(serve_app, name="serve")
loop_app = typer.Typer(
    no_args_is_help=True, help="The closed loop: votes → DPO → a new adapter, promoted or not."
)
app.add_typer(loop_app, name="loop")

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides KEY.SUB=VALUE, e.g. train.max_steps=10 lora.r=8.", show_default=False
    ),
]
Address = Annotated[
    str | None,
    typer.Option(help="Ray dashboard URL of the cluster [env RAY_ADDRESS; http://127.0.0.1:8265]."),
]
TokenFile = Annotated[
    str | None,
    typer.Option(help="File holding the cluster's auth token [env RAY_AUTH_TOKEN(_PATH)]."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster to run on (host:6379, auto); default: the embedded local Ray."),
]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def _version(value: bool) -> None:
    if value:
        print(f"ftservice {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    pass


@app.command()
def validate(spec: str, overrides: Overrides = None, as_json: AsJson = False) -> None:
    """Check a job, serve, campaign or loop spec; print it fully resolved, or every problem (exit
    code 2)."""
    from ftservice.config import dump_spec, load_spec, read_yaml
    from ftservice.feedback.campaign import is_campaign_spec, load_campaign
    from ftservice.loop.spec import is_loop_spec, load_loop
    from ftservice.serve.spec import is_serve_spec, load_serve_spec

    data, _ = read_yaml(spec)
    if is_loop_spec(data):
        resolved = load_loop(spec, overrides or [])
    elif is_serve_spec(data):
        resolved = load_serve_spec(spec, overrides or [])
    elif is_campaign_spec(data):
        resolved = load_campaign(spec, overrides or [])
    else:
        resolved = load_spec(spec, overrides or [], check_inputs=True)
    if as_json:
        _print_json(resolved.model_dump(mode="json"))
    else:
        print(f"# {spec}: valid")
        print(dump_spec(resolved), end="")


@app.command()
def schema(
    kind: Annotated[str, typer.Option(help="job, serve, campaign or loop.")] = "job",
) -> None:
    """Print the JSON Schema of job, serve, campaign or loop specs (for editors and checks)."""
    from ftservice.config import JobSpec
    from ftservice.feedback.campaign import CampaignSpec
    from ftservice.loop.spec import LoopSpec
    from ftservice.serve.spec import ServeSpec

    models = {"job": JobSpec, "serve": ServeSpec, "campaign": CampaignSpec, "loop": LoopSpec}
    if kind not in models:
        raise typer.BadParameter(f"--kind {kind}: use job, serve, campaign or loop")
    _print_json(models[kind].model_json_schema())


@models_app.command("list")
def models_list(as_json: AsJson = False) -> None:
    """Built-in models and models converted in the cache."""
    from ftservice.models import list_models

    rows = list_models()
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["name", "kind", "state", "about"])


@models_app.command("show")
def models_show(
    name: str,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code.")] = False,
    allow_pickle_weights: Annotated[bool, typer.Option(help="Accept .bin weights.")] = False,
    as_json: AsJson = False,
) -> None:
    """Parameters, layers, hidden size, vocabulary, context length, chat template."""
    from ftservice.config import ModelSpec
    from ftservice.models import describe, resolve_model

    spec = ModelSpec(
        name=name, trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights
    )
    info = dataclasses.asdict(describe(resolve_model(spec)))
    if as_json:
        _print_json(info)
        return
    info["parameters"] = f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)"
    info["chat_template"] = "yes" if info["chat_template"] else "no"
    for key, value in info.items():
        print(f"{key.replace('_', ' '):>16}: {value}")


@data_app.command("check")
def data_check(
    files: list[str],
    data_format: Annotated[str, typer.Option("--format", help="Format, or auto.")] = "auto",
    as_json: AsJson = False,
) -> None:
    """Recognise each file's format, validate every record, and summarise."""
    from ftservice.data.loaders import check_files

    rows = check_files(files, data_format)
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["file", "format", "records", "kinds", "turns", "response_chars"])


@data_app.command("show")
def data_show(
    file: str,
    n: Annotated[int, typer.Option("--n", help="How many examples.")] = 3,
    model: Annotated[str, typer.Option(help="Model whose chat template to apply.")] = (
        "smollm2-135m-instruct"
    ),
    data_format: Annotated[str, typer.Option("--format", help="Format, or auto.")] = "auto",
    system_prompt: Annotated[str | None, typer.Option(help="System turn to add.")] = None,
) -> None:
    """Print normalised examples with the model's chat template applied."""
    from ftservice.config import ModelSpec
    from ftservice.data.formats import to_trl
    from ftservice.data.loaders import expand, iter_examples
    from ftservice.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(ModelSpec(name=model)))
    paths = expand([file])
    examples = (x for p in paths for x in iter_examples(p, data_format, system_prompt))
    for i, (loc, fmt, row) in enumerate(examples):
        if i >= n:
            break
        print(f"--- {row['id']} ({loc}, {fmt})")
        print(json.dumps(to_trl(row), ensure_ascii=False))
        if row["kind"] == "text":
            print(row["text"])
            continue
        if row["kind"] == "prompt":  # what the model is asked: its turn is left open
            print(
                tokenizer.apply_chat_template(
                    row["messages"], tokenize=False, add_generation_prompt=True
                )
            )
            continue
        answer = [] if row["kind"] == "chat" else [{"role": "assistant", "content": row["chosen"]}]
        print(tokenizer.apply_chat_template([*row["messages"], *answer], tokenize=False))


@data_app.command("curate")
def data_curate(
    spec: str,
    overrides: Overrides = None,
    output: Annotated[str | None, typer.Option(help="Output folder.")] = None,
    address: RayAddress = None,
    as_json: AsJson = False,
) -> None:
    """Run the curation pipeline of a job spec on Ray Data; write data, report and plot."""
    from ftservice.config import load_spec
    from ftservice.data.curate import curate, report_table
    from ftservice.raycluster import init_ray

    job = load_spec(spec, overrides or [], check_inputs=True)
    init_ray(address)
    report = curate(job, output_dir=output, progress=not as_json)
    if as_json:
        _print_json(report.model_dump(mode="json", by_alias=True))
    else:
        print(report_table(report))


@app.command()
def plan(
    spec: Annotated[str | None, typer.Argument(help="A job spec to plan.")] = None,
    overrides: Overrides = None,
    model: Annotated[
        str | None, typer.Option(help="Instead of a spec: model name, folder or config.json.")
    ] = None,
    method: Annotated[str, typer.Option(help="full, lora or qlora.")] = "lora",
    stage: Annotated[str, typer.Option(help="sft or dpo.")] = "sft",
    gpus: Annotated[int, typer.Option(help="GPUs per node.")] = 1,
    gpu_mem: Annotated[float | None, typer.Option(help="Memory of one GPU, GB.")] = None,
    nodes: Annotated[int, typer.Option(help="Nodes.")] = 1,
    cpu_mem: Annotated[float | None, typer.Option(help="CPU RAM per node, GB.")] = None,
    offload: Annotated[str, typer.Option(help="ZeRO-3 optimizer offload: none, cpu, nvme.")] = (
        "none"
    ),
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 2048,
    micro_batch: Annotated[int, typer.Option(help="Sequences per GPU per step.")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations.")] = True,
    evaluate: Annotated[
        bool, typer.Option(help="Count the evaluation after training (domain, forgetting).")
    ] = True,
    eval_tokens: Annotated[
        int, typer.Option(help="Its longest row: prompt and answer tokens (a spec: measured).")
    ] = 256,
    as_json: AsJson = False,
) -> None:
    """Peak memory per device of a job (a spec, or a model and method), and what fits."""
    from ftservice import memory

    if spec is not None:
        from ftservice.config import load_spec

        result = memory.plan_for_spec(load_spec(spec, overrides or []), evaluate=evaluate)
    elif model is not None:
        for flag, value, allowed in [
            ("--method", method, ("full", "lora", "qlora")),
            ("--stage", stage, ("sft", "dpo")),
            ("--offload", offload, ("none", "cpu", "nvme")),
        ]:
            if value not in allowed:
                raise memory.PlanError(f"{flag} {value}: use one of {', '.join(allowed)}")
        result = memory.plan_with_verdict(
            memory.PlanInput(
                memory.resolve_shape(model), method=method, stage=stage, gpus=gpus,
                nodes=nodes, device_mem_gb=gpu_mem, cpu_mem_gb=cpu_mem, offload=offload,
                seq_len=seq_len, micro_batch=micro_batch, lora_r=lora_r,
                gradient_checkpointing=gradient_checkpointing, evaluate=evaluate,
                eval_tokens=eval_tokens,
            )
        )  # fmt: skip
    else:
        raise memory.PlanError("give a job spec, or --model with --method, --gpus, --gpu-mem")
    if as_json:
        _print_json(result.to_json())
    else:
        print(memory.format_plan(result))


@app.command()
def train(
    spec: str,
    overrides: Overrides = None,
    address: RayAddress = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after N optimizer steps (a short real run).")
    ] = None,
    evaluate: Annotated[bool, typer.Option(help="Evaluate base and tuned at the end.")] = True,
    eval_limit: Annotated[
        int | None, typer.Option(help="Evaluate on the first N prompts of each eval set.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start even when the plan says it cannot fit.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Fine-tune on Ray Train (resumes the same spec's run), publish the artifact, evaluate."""
    from ftservice import memory
    from ftservice.config import load_spec
    from ftservice.evaluate import format_report
    from ftservice.raycluster import init_ray
    from ftservice.train.driver import train as run_training

    job = load_spec(spec, overrides or [], check_inputs=True)
    try:
        planned = memory.plan_for_spec(job, evaluate=evaluate)
    except memory.PlanError as e:  # a model the planner cannot size must not block training
        print(f"plan: not available ({e})", file=sys.stderr)
        planned = None
    else:
        print(memory.format_plan(planned), file=sys.stderr)
    if planned is not None and planned.fits is False and not force:
        have = f"a device has {planned.device_bytes / memory.GiB:.1f} GiB"
        if planned.training_fits:
            raise memory.PlanError(
                f"{spec}: training fits, but the evaluation after it needs "
                f"{planned.evaluation_bytes / memory.GiB:.1f} GiB per device and {have}; "
                "train with --no-evaluate and run `ftservice eval` where it fits, lower "
                "eval.max_new_tokens, or pass --force to start anyway."
            )
        raise memory.PlanError(
            f"{spec}: the plan needs {planned.total_bytes / memory.GiB:.1f} GiB per device but "
            f"{have}; lower train.micro_batch_size or data.max_seq_length, turn on "
            "train.gradient_checkpointing, use the method the plan suggests, or pass --force "
            "to start anyway."
        )
    init_ray(address)
    result = run_training(job, max_steps=max_steps, evaluate=evaluate, eval_limit=eval_limit)
    if as_json:
        _print_json({"artifact": result.artifact.location, **result.artifact.meta.model_dump()})
        return
    m = result.artifact.meta.metrics
    print(f"\n== {result.artifact.name}: {job.method} {job.stage} of {job.model.name}")
    first, last = m.get("first_loss") or float("nan"), m.get("last_loss") or float("nan")
    print(f"loss:          {first:.3f} → {last:.3f} over {m.get('global_step')} steps")
    if replay := m.get("replay"):
        kl = job.train.kl_to_base
        how = f"taught by KL to the base × {kl:g}" if kl else "taught by cross-entropy"
        share = job.data.replay.ratio
        of = "of each step's examples, beside its pairs" if job.stage == "dpo" else "of examples"
        print(f"replay:        {replay['examples']} base answers, {share:.0%} {of} ({how})")
    if result.evaluation:
        print(format_report(result.evaluation))
    print(f"artifact:      {result.artifact.location}")


@app.command()
def sweep(
    target: Annotated[str, typer.Argument(help="A sweep spec (tune/*.yaml), or 'report'.")],
    directory: Annotated[
        str | None, typer.Argument(help="With 'report': the sweep's folder.", show_default=False)
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted sweep.")] = False,
    address: RayAddress = None,
    promote: Annotated[
        str | None, typer.Option(help="With 'report': copy the best artifact into REGISTRY.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Sweep a job spec on Ray Tune (ASHA early stopping), or report a finished sweep."""
    import os
    from pathlib import Path

    from ftservice import sweep as sweeps

    if target == "report":
        if directory is None:
            raise sweeps.SweepError("usage: ftservice sweep report DIR [--json] [--promote REG]")
        root = Path(directory)
        if not (root / "tune").is_dir():
            raise sweeps.SweepError(f"{root}: not a sweep folder (no tune/ inside)")
        spec = sweeps.SweepSpec.model_validate(
            json.loads(next((root / "tune").glob("*/params.json")).read_text())["__sweep"]
        )
        summary = sweeps.write_results(root, spec)
        if promote:
            print(f"promoted {sweeps.promote(root, promote)}")
        if as_json:
            _print_json(summary)
            return
        rows = [
            {"rank": i + 1, "trial": r["trial"], "state": r["state"],
             spec.scheduler.metric: "-" if r["best"] is None else f"{r['best']:.4f}",
             "reports": r["reports"],
             **{k: f"{v:.4f}" for k, v in (r["validation"] or {}).items()
                if k != spec.scheduler.metric},
             **{k: sweeps._short(v) for k, v in r["params"].items()}}
            for i, r in enumerate(summary["trials"])
        ]  # fmt: skip
        columns = list(dict.fromkeys(k for row in rows for k in row)) or ["rank"]
        _table([{c: row.get(c, "-") for c in columns} for row in rows], columns)
        if summary["selection"]:
            print(f"chosen: {summary['selection']}")
        if summary["held_out"]:
            from ftservice.evaluate import format_report

            print(f"held out (the best trial only; trials were selected on "
                  f"{spec.scheduler.metric}):")  # fmt: skip
            print(format_report(summary["held_out"]))
        plots = [p for p in ("heatmap.png", "curves.png", "pareto.png") if (root / p).exists()]
        print(f"plots: {', '.join(str(root / p) for p in plots)}")
        return
    from ftservice.raycluster import init_ray

    sweeps.load_sweep(target)  # refuse a bad space before Ray starts
    # trials run in the project folder, so relative data paths mean what they mean here
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    init_ray(address)
    sweeps.run_sweep(target, resume=resume)
    spec, _ = sweeps.load_sweep(target)
    root = Path(spec.output_dir) / spec.name
    print(f"sweep finished: `ftservice sweep report {root}` ranks it")


@app.command("eval")
def eval_(
    artifact: str,
    registry: Annotated[str, typer.Option(help="Registry to look names up in.")] = "artifacts",
    limit: Annotated[int | None, typer.Option(help="First N prompts of each set.")] = None,
    as_json: AsJson = False,
) -> None:
    """Domain score and forgetting of an artifact, beside its base model."""
    import torch

    from ftservice.artifacts import load_artifact, update_metrics
    from ftservice.config import JobSpec
    from ftservice.evaluate import eval_placement, evaluate_artifact_folder, format_report
    from ftservice.models import resolve_model

    art = load_artifact(artifact, registry)
    job = JobSpec.model_validate(art.meta.spec)
    base = resolve_model(job.model)
    placement = eval_placement(job)
    if placement["device"] != "cpu" and not torch.cuda.is_available():
        placement = eval_placement(job.model_copy(update={"scaling": job.scaling.model_copy(
            update={"use_gpu": False})}))  # fmt: skip
        print("no GPU here: evaluating on the CPU in fp32", file=sys.stderr)
    report = evaluate_artifact_folder(
        art.location, str(base.path), art.is_adapter, job.eval.domain, job.eval.general,
        job.eval.max_new_tokens, limit, job.data.system_prompt, None, placement,
        base.fingerprint,
    )  # fmt: skip
    if limit is None:
        update_metrics(art, {"evaluation": report})
    if as_json:
        _print_json(report)
    else:
        print(format_report(report))


@app.command()
def export(
    artifact: str,
    merge: Annotated[str, typer.Option("--merge", help="Folder for merged full weights.")],
    registry: Annotated[str, typer.Option(help="Registry to look names up in.")] = "artifacts",
) -> None:
    """Write an adapter merged into its base as plain full weights (from_pretrained loads it)."""
    from ftservice.artifacts import export_merged, load_artifact

    out = export_merged(load_artifact(artifact, registry), merge)
    print(f"merged weights written to {out}")


Registry = Annotated[str, typer.Option(help="Registry folder (or URI) the artifacts are in.")]


@artifacts_app.command("list")
def artifacts_list(
    registry: Annotated[str, typer.Argument(help="Registry folder (or URI).")] = "artifacts",
    as_json: AsJson = False,
) -> None:
    """Every artifact in a registry: method, stage, parent, key metric, created."""
    from ftservice.artifacts import key_metric, list_artifacts

    rows = [
        {"name": a.name, "method": a.method, "stage": a.stage, "parent": a.meta.parent or "-",
         "metric": key_metric(a), "created": a.meta.created}
        for a in list_artifacts(registry)
    ]  # fmt: skip
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["name", "method", "stage", "parent", "metric", "created"])


@artifacts_app.command("show")
def artifacts_show(name: str, registry: Registry = "artifacts", as_json: AsJson = False) -> None:
    """One artifact: its spec in short, metrics, fingerprints, base and data."""
    from ftservice.artifacts import key_metric, load_artifact

    art = load_artifact(name, registry)
    meta = art.meta
    if as_json:
        _print_json({"location": art.location, **meta.model_dump(mode="json")})
        return
    spec, m = meta.spec, meta.metrics
    rows = [
        ("name", meta.name),
        ("location", art.location),
        ("method / stage", f"{art.method} / {art.stage}"),
        ("base model", f"{meta.base_model.name} (loads as {meta.base_model.load_as})"),
        ("base fingerprint", meta.base_model.fingerprint),
        ("dataset fingerprint", meta.dataset_fingerprint),
        *((f"data: {d.kind}", f"{d.path} ({d.fingerprint[:16]})") for d in meta.data),
        ("parent", meta.parent or "-"),
        ("sweep trial", f"{meta.lineage.sweep}/{meta.lineage.trial}" if meta.lineage else "-"),
        ("learning rate", spec["train"]["learning_rate"]),
        ("lora r / alpha", f"{spec['lora']['r']} / {spec['lora']['alpha']}"
         if art.is_adapter else "-"),
        ("steps", m.get("global_step")),
        ("loss", f"{m.get('first_loss')} → {m.get('last_loss')}"),
        ("key metric", key_metric(art)),
        ("created", meta.created),
    ]  # fmt: skip
    for key, value in rows:
        print(f"{key:>20}: {value}")
    if m.get("evaluation"):
        from ftservice.evaluate import format_report

        print(format_report(m["evaluation"]))


@artifacts_app.command("lineage")
def artifacts_lineage(name: str, registry: Registry = "artifacts", as_json: AsJson = False) -> None:
    """The chain from the base model through SFT, a sweep trial and DPO rounds to NAME."""
    from ftservice.artifacts import key_metric, lineage, load_artifact

    chain = lineage(load_artifact(name, registry), registry)
    base = chain[0].meta.base_model
    steps = [
        {"name": a.name, "method": a.method, "stage": a.stage, "metric": key_metric(a),
         "sweep": f"{a.meta.lineage.sweep}/{a.meta.lineage.trial}" if a.meta.lineage else None,
         "feedback": a.meta.feedback.model_dump() if a.meta.feedback else None,
         "ratings": a.meta.metrics.get("feedback_ratings") or [],
         "parent": a.meta.parent, "location": a.location}
        for a in chain
    ]  # fmt: skip
    if as_json:
        _print_json({"base": base.model_dump(mode="json"), "chain": steps})
        return
    print(f"base  {base.name}  ({base.load_as}, fingerprint {base.fingerprint[:12]})")
    for depth, step in enumerate(steps, 1):
        sweep = f"  [sweep {step['sweep']}]" if step["sweep"] else ""
        fb = step["feedback"]
        votes = (f"  [loop {fb['loop']} round {fb['round']}: {fb['pairs']} pairs from "
                 f"{fb['votes']} votes, pairs {fb['pairs_fingerprint'][:12]}, vote ids in "
                 f"{fb['vote_ids']}]") if fb else ""  # fmt: skip
        rated = "".join(f"  rating {x['rating']:.0f} [{x['ci95'][0]:.0f}, {x['ci95'][1]:.0f}] "
                        f"in {x['loop']} round {x['round']}" for x in step["ratings"])  # fmt: skip
        print(f"{'  ' * depth}└─ {step['name']}  {step['method']} {step['stage']}  "
              f"{step['metric']}{sweep}{votes}{rated}")  # fmt: skip


@artifacts_app.command("rm")
def artifacts_rm(
    name: str,
    registry: Registry = "artifacts",
    force: Annotated[bool, typer.Option("--force", help="Remove even if it is a parent.")] = False,
) -> None:
    """Remove an artifact (refused while another artifact names it as its parent)."""
    from ftservice.artifacts import remove

    print(f"removed {remove(name, registry, force)}")


def served_adapters(job) -> list:
    """The gate's verdict on every adapter the spec would serve (as the app lists them)."""
    from ftservice.models import resolve_model
    from ftservice.serve.gate import Gate, candidates

    gate = Gate(resolve_model(job.model), job.gate)
    return [gate.check(artifact.name, [registry])[0] for registry, artifact in candidates(job)]


@serve_app.command("run")
def serve_run(
    spec: str,
    overrides: Overrides = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: the spec's).")] = None,
    address: RayAddress = None,
) -> None:
    """Run the serving app in the foreground until Ctrl-C or SIGTERM, then drain and stop."""
    import signal
    import threading

    from ray import serve

    from ftservice.raycluster import init_ray
    from ftservice.serve.app import build_app
    from ftservice.serve.deploy import http_options
    from ftservice.serve.spec import load_serve_spec

    job = load_serve_spec(spec, [*(overrides or []), *([f"port={port}"] if port else [])])
    stop = threading.Event()
    init_ray(address)
    try:
        serve.start(http_options=http_options(job))
        serve.run(build_app(job), name=job.name, route_prefix="/", blocking=False)
        # after ray.init, which installs its own fatal-signal handler for SIGTERM
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        url = f"http://{job.host}:{job.port}"
        base = job.base_name or job.model.name
        print(f"serving {job.name} at {url}/v1 (base model: {base})")
        for verdict in served_adapters(job):
            state = "servable" if verdict.servable else f"refused: {verdict.reason}"
            print(f"  adapter {verdict.name}: {state}")
        print(f'models: curl -s {url}/v1/models -H "Authorization: Bearer $FTSERVICE_API_KEY"')
        print(
            f'chat:   curl -s {url}/v1/chat/completions -H "Authorization: Bearer '
            '$FTSERVICE_API_KEY" -H "Content-Type: application/json" -d \'{"model": "'
            f'{base}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
        )
        for campaign in job.campaigns:
            print(f"page:   {url}/arena (campaign {campaign.name}; an annotator key: ftservice "
                  f"feedback annotators add NAME --campaign {campaign.name})")  # fmt: skip
        print("Ctrl-C stops it.", flush=True)
        stop.wait()
        print("draining and stopping ...", flush=True)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


@serve_app.command("deploy")
def serve_deploy(
    spec: str,
    overrides: Overrides = None,
    address: Address = None,
    token_file: TokenFile = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait until the app is RUNNING (0: don't wait).")
    ] = 0,
) -> None:
    """Deploy (or upgrade in place) the app on a running cluster through Ray's Serve REST
    API; the cluster's other Serve applications are kept."""
    from ftservice.serve import deploy
    from ftservice.serve.spec import load_serve_spec

    job = load_serve_spec(spec, overrides or [])
    client = deploy.connect(address, token_file)
    deploy.deploy(client, job)
    print(f"deployed {job.name} (http://{job.host}:{job.port}/v1 on the cluster's Serve proxy)")
    if wait > 0:
        state = deploy.wait(client, job.name, wait)
        if state != "RUNNING":
            raise typer.Exit(1)


@serve_app.command("status")
def serve_status(
    address: Address = None, token_file: TokenFile = None, as_json: AsJson = False
) -> None:
    """Every Serve application on the cluster, with its deployments and replicas."""
    from ftservice.serve import deploy

    apps = deploy.status(deploy.connect(address, token_file))
    if as_json:
        _print_json(apps)
        return
    if not apps:
        print("(no Serve applications)")
    for name, app in apps.items():
        print(f"{name}: {app['status']}{' - ' + app['message'] if app['message'] else ''}")
        for dep, info in app["deployments"].items():
            print(f"  {dep}: {info['status']}, {info['replicas']} replica(s)")


@serve_app.command("shutdown")
def serve_shutdown(
    address: Address = None,
    token_file: TokenFile = None,
    name: Annotated[
        str | None, typer.Option(help="Only this application (default: all of Serve).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Shut down one Serve application, or all of Serve on the cluster (as `serve
    shutdown`)."""
    from ftservice.serve import deploy

    client = deploy.connect(address, token_file)
    what = f"the Serve application '{name}'" if name else "every Serve application"
    if not yes and not typer.confirm(f"Shut down {what} on the cluster?"):
        raise typer.Exit(1)
    removed = deploy.shutdown(client, name)
    print(f"shut down: {', '.join(removed) or '(nothing was deployed)'}")


StoreUrl = Annotated[
    str,
    typer.Option(
        "--store", envvar="FTSERVICE_STORE_URL",
        help="The service's database (a serve spec's store.url) [env FTSERVICE_STORE_URL].",
    ),
]  # fmt: skip
DEFAULT_STORE = "sqlite:///state/ftservice.db"


@keys_app.command("create")
def keys_create(
    name: str,
    scope: Annotated[
        list[str], typer.Option("--scope", help="inference, admin, annotator or jobs (repeat).")
    ],
    project: Annotated[str, typer.Option(help="The project the key belongs to.")] = "default",
    rate_limit: Annotated[
        int | None, typer.Option(help="This key's requests per minute (default: the app's).")
    ] = None,
    store: StoreUrl = DEFAULT_STORE,
) -> None:
    """Make a key; it is printed once, and only its hash is stored."""
    from ftservice.store.db import open_store
    from ftservice.store.keys import create_key

    secret = create_key(open_store(store), name, scope, project, rate_limit)
    print(secret)
    print(f"key '{name}' ({', '.join(scope)}, project {project}) created: keep it now, it "
          "is not shown again", file=sys.stderr)  # fmt: skip


@keys_app.command("list")
def keys_list(store: StoreUrl = DEFAULT_STORE, as_json: AsJson = False) -> None:
    """Every key with its scopes, project, state and usage (never the key itself)."""
    from ftservice.store.db import open_store
    from ftservice.store.keys import list_keys

    rows = list_keys(open_store(store))
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["name", "prefix", "scopes", "project", "state", "requests",
                      "prompt_tokens", "completion_tokens", "last_used"])  # fmt: skip


@keys_app.command("revoke")
def keys_revoke(name: str, store: StoreUrl = DEFAULT_STORE) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    from ftservice.store.db import open_store
    from ftservice.store.keys import revoke_key

    revoke_key(open_store(store), name)
    print(f"key '{name}' revoked")


@annotators_app.command("add")
def annotators_add(
    name: str,
    campaign: Annotated[str, typer.Option(help="The campaign NAME may vote in.")],
    store: StoreUrl = DEFAULT_STORE,
) -> None:
    """Let NAME vote in a campaign: makes an annotator key (printed once) unless NAME has one."""
    from ftservice.feedback.votes import add_annotator
    from ftservice.store.db import open_store

    secret = add_annotator(open_store(store), name, campaign)
    if secret is not None:
        print(secret)
        print(f"annotator '{name}' can vote in '{campaign}': give them this key (sign in on "
              "/arena); it is not shown again", file=sys.stderr)  # fmt: skip
    else:
        print(f"annotator '{name}' (an existing key) can vote in '{campaign}'", file=sys.stderr)


def _campaign_votes(store_url: str, campaign: str, source: str = "all"):
    from ftservice.feedback import votes
    from ftservice.store.db import open_store

    if source not in ("all", "human", "simulated"):
        raise typer.BadParameter(f"{source}: use all, human or simulated", param_hint="--source")
    from ftservice.feedback.quality import counted_votes

    store = open_store(store_url)
    spec = votes.campaign_spec(store, campaign)  # names the campaigns there are when unknown
    rows, items = votes.effective_rows(store, campaign, None if source == "all" else source)
    return store, counted_votes(rows, items, spec.quality), items


def _interval(row: dict) -> str:
    lo, hi = row["ci95"]
    if row.get("open") == "above":
        return f"open: never lost ({row['won']} wins)"
    if row.get("open") == "below":
        return f"open: never won ({row['lost']} losses)"
    return f"{lo:.0f} – {hi:.0f}"


@feedback_app.command("leaderboard")
def feedback_leaderboard(
    campaign: str,
    store: StoreUrl = DEFAULT_STORE,
    out: Annotated[
        str | None, typer.Option(help="Folder for the plots (default state/feedback/CAMPAIGN).")
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    source: Annotated[
        str, typer.Option(help="Whose votes: all, human or simulated annotators'.")
    ] = "all",
    as_json: AsJson = False,
) -> None:
    """Bradley–Terry ratings with bootstrap intervals, the win-rate matrix and annotator
    agreement; writes leaderboard.png and winrate.png."""
    from pathlib import Path

    from ftservice.feedback import votes
    from ftservice.feedback.leaderboard import leaderboard, plots

    db, counted, items = _campaign_votes(store, campaign, source)
    board = leaderboard(counted.votes, votes.campaign_base(db, campaign), resamples, items=items)
    board["quality"] = {"left_out": counted.dropped,
                        "annotators": [q.row() for q in counted.annotators.values()]}  # fmt: skip
    folder = Path(out or f"state/feedback/{campaign}")
    written = plots(board, folder) if len(board["ratings"]) >= 2 else []
    if as_json:
        _print_json(board | {"plots": [str(p) for p in written]})
        return
    print(f"{campaign}: {board['votes']} votes · {board['scale']}")
    _table(
        [
            {
                "rank": r["rank"],
                "model": r["model"],
                "rating": f"{r['rating']:.0f}",
                "95% interval": _interval(r),
                "votes": r["votes"],
            }
            for r in board["ratings"]
        ],
        ["rank", "model", "rating", "95% interval", "votes"],
    )
    agreement = board.get("agreement")
    if agreement:
        print(
            f"agreement: {agreement['pairwise']:.0%} of annotator pairs on "
            f"{agreement['items']} shared comparisons; Fleiss' kappa "
            f"{agreement['fleiss_kappa']}"
        )
    _quality_table(board["quality"])
    for p in written:
        print(f"wrote {p}")  # fmt: skip


def _quality_table(quality: dict) -> None:
    """Each annotator's checks, reliability and flags (the CLI reads the store: an admin's)."""
    print("annotators (reliability = gold right + agreed, over gold + shared comparisons):")
    _table(
        [
            {
                "annotator": q["annotator"],
                "votes": q["votes"],
                "gold": f"{q['gold_right']}/{q['gold']}",
                "agreed": f"{q['agreed']}/{q['shared']}",
                "reliability": "-" if q["reliability"] is None else f"{q['reliability']:.2f}",
                "s/vote": q["median_s_per_vote"],
                "counts": "yes" if q["counts"] else "no",
                "flags": "; ".join(q["flags"]) or "-",
            }
            for q in quality["annotators"]
        ],
        ["annotator", "votes", "gold", "agreed", "reliability", "s/vote", "counts", "flags"],
    )
    left_out = quality["left_out"]
    if any(left_out.values()):
        print("left out: " + ", ".join(f"{k} {v}" for k, v in sorted(left_out.items()) if v))


@feedback_app.command("simulate")
def feedback_simulate(
    campaign: str,
    url: Annotated[str, typer.Option(help="The serving app.")] = "http://127.0.0.1:8000",
    annotators: Annotated[int, typer.Option(help="Simulated annotators (keys).")] = 3,
    votes: Annotated[int, typer.Option(help="Votes to cast in all.")] = 30,
    profile: Annotated[
        str,
        typer.Option(
            help="How they judge: knows_answers (the reference fact first, then "
            "plain and short) or length_rule (plain and short alone)."
        ),
    ] = "knows_answers",
    accuracy: Annotated[
        float | None, typer.Option(help="Share of votes kept as judged (profile's default).")
    ] = None,
    position_bias: Annotated[
        float | None, typer.Option(help="Share of votes for the left answer (profile's default).")
    ] = None,
    spammers: Annotated[float, typer.Option(help="Share of annotators voting at random.")] = 0.0,
    read_seconds: Annotated[
        float | None, typer.Option(help="Seconds reading before a vote (profile's default).")
    ] = None,
    writes_answer: Annotated[
        float | None,
        typer.Option(
            help="Share of 'both bad' votes with the right answer written in (profile's default)."
        ),
    ] = None,
    seed: int = 0,
    store: StoreUrl = DEFAULT_STORE,
) -> None:
    """Simulated annotators vote through the page's HTTP routes, as a profile of people
    (ftservice/feedback/simulate.py gives the defaults and their sources) with a share of
    spammers; the reference facts are those of the campaign's prompt files. Their keys
    (project `simulated`) are revoked at the end."""
    import secrets
    import time

    from pydantic import ValidationError

    from ftservice.feedback.simulate import (
        SIMULATED_PROJECT,
        SimulateSpec,
        references_of,
        simulate,
    )
    from ftservice.feedback.votes import add_annotator, campaign_spec
    from ftservice.store.db import open_store
    from ftservice.store.keys import revoke_key

    try:
        spec = SimulateSpec(annotators=annotators, profile=profile, accuracy=accuracy,
                            position_bias=position_bias, spammers=spammers,
                            read_seconds=read_seconds, writes_answer=writes_answer,
                            seed=seed)  # fmt: skip
    except ValidationError as e:
        raise typer.BadParameter(
            "; ".join(
                f"--{'-'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
            )
        ) from None
    db = open_store(store)
    references = references_of(campaign_spec(db, campaign))
    run = secrets.token_hex(3)
    names = [f"sim-{campaign}-{run}-{k}" for k in range(annotators)]
    keys = [add_annotator(db, n, campaign, project=SIMULATED_PROJECT) for n in names]
    last = [0.0]

    def progress(report) -> None:
        if report.votes == votes or time.time() - last[0] > 5:
            last[0] = time.time()
            print(f"simulate {campaign}: {report.votes}/{votes} votes "
                  f"({report.seconds:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip

    try:
        report = simulate(url, campaign, keys, votes, spec, references, progress)
    finally:
        for n in names:
            revoke_key(db, n)
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(report.verdicts.items()))
    print(f"{report.votes} votes by {annotators} simulated annotators in {report.seconds:.0f} s "
          f"({verdicts}; {report.random_votes} not as judged, {report.spam_votes} of them "
          f"spam; {report.written_answers} right answers written in; {report.retries} "
          "retries)")  # fmt: skip
    if report.votes < votes:
        print(f"stopped early: {report.done_annotators} annotators reached their quota or the "
              "campaign's end", file=sys.stderr)  # fmt: skip


@feedback_app.command("export")
def feedback_export(
    campaign: str,
    format: Annotated[str, typer.Option("--format", help="trl, openai or kto.")] = "trl",
    out: Annotated[str | None, typer.Option(help="File to write (JSON lines).")] = None,
    store: StoreUrl = DEFAULT_STORE,
) -> None:
    """Preference data from the votes that count: TRL's conversational preference format,
    OpenAI's DPO format or TRL's KTO format, with a lineage side file."""
    from pathlib import Path

    from ftservice.feedback.export import export_rows, write_export

    _, counted, items = _campaign_votes(store, campaign)
    rows = counted.votes
    try:
        data, lineage, counts = export_rows(rows, items, format)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--format") from None
    counts |= {f"left_out_{k}": n for k, n in counted.dropped.items() if n}
    path = Path(out or f"state/feedback/{campaign}/{format}.jsonl")
    side = write_export(data, lineage, counts, path,
                        {"campaign": campaign, "format": format, "votes": len(rows)})  # fmt: skip
    print(f"wrote {len(data)} rows to {path} (lineage: {side})")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


@feedback_app.command("dump")
def feedback_dump(
    campaign: str,
    out: Annotated[str | None, typer.Option(help="File (JSON lines); default stdout.")] = None,
    store: StoreUrl = DEFAULT_STORE,
) -> None:
    """Back up a campaign: every row of it (votes with corrections, comparisons, answers)."""
    from ftservice.feedback.votes import dump
    from ftservice.store.db import open_store

    lines = "".join(json.dumps(x) + "\n" for x in dump(open_store(store), campaign))
    if out:
        from pathlib import Path

        Path(out).write_text(lines)
        print(f"wrote {lines.count(chr(10))} rows to {out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)


@feedback_app.command("load")
def feedback_load(file: str, store: StoreUrl = DEFAULT_STORE) -> None:
    """Restore a dump; rows already in the store are kept as they are."""
    from pathlib import Path

    from ftservice.feedback.votes import FeedbackError, load
    from ftservice.store.db import open_store

    lines = []
    for n, text in enumerate(Path(file).read_text().splitlines(), 1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except ValueError as e:
                raise FeedbackError(f"{file}:{n}: not JSON ({e})") from None
    inserted = load(open_store(store), lines, file)
    print(f"restored from {file}: " + (", ".join(f"{k} {v}" for k, v in inserted.items())
                                       or "nothing new"))  # fmt: skip


@feedback_app.command("forget")
def feedback_forget(
    annotator: str,
    store: StoreUrl = DEFAULT_STORE,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete one person's votes, comments and comparisons (their typed prompts too)."""
    from ftservice.feedback.votes import forget
    from ftservice.store.db import open_store

    if not yes and not typer.confirm(f"Delete every vote and comment of '{annotator}'?"):
        raise typer.Exit(1)
    counts = forget(open_store(store), annotator)
    print(f"forgot '{annotator}': " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@app.command()
def submit(
    spec: str,
    overrides: Overrides = None,
    address: Address = None,
    token_file: TokenFile = None,
    new: Annotated[bool, typer.Option("--new", help="Start another run of the same spec.")] = False,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the job to end (0: return at once).")
    ] = 0,
) -> None:
    """Submit a job spec to a Ray cluster (the same spec twice gives the same job)."""
    from ftservice import jobs

    prepared = jobs.prepare(spec, overrides or [])
    client = jobs.connect(address, token_file=token_file)
    sub = jobs.submit(prepared, client, new=new)
    if sub.created:
        print(f"submitted {sub.submission_id}")
    else:
        print(
            f"already submitted as {sub.submission_id} ({sub.status}); "
            "pass --new to start another run of this spec"
        )
    if wait > 0:
        state = jobs.wait(client, sub.submission_id, wait)
        print(f"{sub.submission_id}: {state}")
        if state == "FAILED":
            raise typer.Exit(1)


@app.command()
def status(
    job_id: str, address: Address = None, token_file: TokenFile = None, as_json: AsJson = False
) -> None:
    """Status of a submitted job."""
    from ftservice import jobs

    info = jobs.status(jobs.connect(address, token_file=token_file), job_id)
    if as_json:
        _print_json(info)
    else:
        print(f"{info['submission_id']}: {info['status']}  {info['message'] or ''}".rstrip())


@app.command()
def logs(
    job_id: str,
    address: Address = None,
    token_file: TokenFile = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends.")] = False,
) -> None:
    """Print a job's logs."""
    from ftservice import jobs

    jobs.logs(jobs.connect(address, token_file=token_file), job_id, follow=follow)


@app.command()
def stop(job_id: str, address: Address = None, token_file: TokenFile = None) -> None:
    """Stop a running job and wait until it has stopped."""
    from ftservice import jobs

    state = jobs.stop(jobs.connect(address, token_file=token_file), job_id)
    print(f"{job_id}: {state}")


@app.command("list")
def list_(address: Address = None, token_file: TokenFile = None, as_json: AsJson = False) -> None:
    """Jobs on the cluster, oldest first."""
    from ftservice import jobs

    rows = jobs.list_jobs(jobs.connect(address, token_file=token_file))
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["submission_id", "status", "name"])


def main() -> None:
    try:
        app()
    except FtserviceError as e:
        print(f"error: {e}" if "\n" not in str(e) else str(e), file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()


@loop_app.command("run")
def loop_run(
    spec: str,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the loop where it stopped (its state is in the store).")
    ] = False,
    keep_serving: Annotated[
        bool,
        typer.Option(help="When the loop started the app, keep serving it after the last round."),
    ] = True,
    address: RayAddress = None,
    as_json: AsJson = False,
) -> None:
    """Run rounds on the live app: votes → pairs → DPO on Ray Train → publish → gate →
    hot-add as a canary of the alias → the next round's votes promote or roll it back."""
    import threading

    from ftservice.loop.runner import app_healthy, run_loop
    from ftservice.loop.spec import load_loop
    from ftservice.serve.spec import load_serve_spec

    loop = load_loop(spec, overrides or [])
    serving = load_serve_spec(loop.serve)
    url = f"http://{serving.host}:{serving.port}"
    started_here = not app_healthy(url)
    report = run_loop(spec, overrides or [], resume=resume, address=address)
    if as_json:
        _print_json(report)
    else:
        print(f"loop {report['loop']} on {url}: {len(report['rounds'])} round(s) in "
              f"{report['seconds']:.0f} s")  # fmt: skip
        for r in report["rounds"]:
            decision = r.get("decision")
            what = f"  round {r['round']}: {r['votes']} votes"
            if r.get("leader"):
                what += f", leader {r['leader']}"
            if decision:
                what += f"; {decision['subject']} {decision['action']}"
            if r.get("challenger"):
                what += f"; trained {r['challenger']}"
            print(what)
        alias = report["alias"]
        canary = (
            f" (canary {alias['canary']} {alias['canary_share']:.0%})" if alias["canary"] else ""
        )
        print(f"{loop.promotion.alias} → {alias['target']}{canary}")
        out = Path(loop.output_dir) / loop.name
        print(f"report: {out / 'loop.json'}, plot: {out / 'rounds.png'}")
    if started_here and keep_serving:
        print(f"serving at {url}/v1 and {url}/arena; Ctrl-C stops it.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


@feedback_app.command("history")
def feedback_history(
    app_name: Annotated[
        str | None, typer.Option("--app", help="Only this app's aliases.", show_default=False)
    ] = None,
    store: StoreUrl = DEFAULT_STORE,
    as_json: AsJson = False,
) -> None:
    """Every change of a model alias (production) with its evidence: created, canary,
    promoted, rolled back, inconclusive, refused."""
    from ftservice.feedback.rounds import alias_history
    from ftservice.store.db import open_store

    events = alias_history(open_store(store), app_name)
    if as_json:
        _print_json(events)
        return
    rows = []
    for e in events:
        h2h = e["evidence"].get("head_to_head") or {}
        rate = h2h.get("winrate")
        rows.append({
            "at": e["at"][:19], "app": e["app"], "alias": e["alias"], "action": e["action"],
            "subject": e["subject"] or "-", "target": e["target"],
            "canary": f"{e['canary']} {e['canary_share']:.0%}" if e["canary"] else "-",
            "win rate": "-" if rate is None else
            f"{rate:.2f} [{h2h['interval'][0]:.2f}, {h2h['interval'][1]:.2f}] n={h2h['votes']}",
            "round": f"{e['loop']}/{e['round']}" if e["loop"] else "-",
            "why": "; ".join(e["evidence"].get("reasons") or [e["evidence"].get("reason", "")]),
        })  # fmt: skip
    _table(rows, ["at", "app", "alias", "action", "subject", "target", "canary", "win rate",
                  "round", "why"])  # fmt: skip
