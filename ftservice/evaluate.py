"""Domain score and forgetting, for a tuned model beside its base.

- Domain score: greedy answers to the held-out domain questions; an answer counts when the
  normalised reference answer appears in the normalised generation. Also the mean loss of
  the reference outputs.
- Forgetting: the base model answers the general prompts (greedy); over those answer
  tokens, the mean per-token KL(base || tuned) of the next-token distributions, and the
  perplexity of the answers under each model. The base's drift from itself is 0.

For adapters the base is the same model with the adapter disabled: no second copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

from ftservice import storage
from ftservice.data.judges import answer_matches
from ftservice.data.loaders import DataError, load_rows
from ftservice.models import train_dtype

CPU_PLACEMENT = {"device": "cpu", "dtype": "float32", "quantization": None, "gpus": 0}


@contextlib.contextmanager
def _phase(label: str):
    """One progress line per evaluation phase, with its time (phases take tens of seconds)."""
    start = time.perf_counter()
    yield
    print(f"ftservice eval: {label} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _prompt(record: dict, system_prompt: str | None = None) -> list[dict]:
    """The question as the model saw questions in training (same system prompt)."""
    if "messages" in record:
        turns = [m for m in record["messages"] if m["role"] != "assistant"]
    else:
        text = record.get("instruction") or record.get("prompt") or ""
        if record.get("input"):
            text = f"{text}\n\n{record['input']}"
        turns = [{"role": "user", "content": text}]
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    return turns


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch: int = 16):
    """Greedy answers, batched with left padding."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for i in range(0, len(prompts), batch):
            texts = [
                tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                for p in prompts[i : i + batch]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return answers


def _batches(tokenizer, prompts, answers, batch: int):
    """Right-padded prompt+answer batches and a mask of the answer tokens [B, T]."""
    for i in range(0, len(prompts), batch):
        ids, masks = [], []
        for p, a in zip(prompts[i : i + batch], answers[i : i + batch], strict=True):
            prompt_ids = tokenizer.apply_chat_template(
                p, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            answer_ids = tokenizer(a, add_special_tokens=False)["input_ids"]
            ids.append(list(prompt_ids) + answer_ids)
            masks.append([0] * len(prompt_ids) + [1] * len(answer_ids))
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        answer_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
        yield input_ids, attention, answer_mask


def _log_probs(model, input_ids, attention):
    # logits at t predict token t+1: shift so position t scores input_ids[t]
    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()  # [B, T-1, V]


@torch.no_grad()
def answer_stats(model, tokenizer, prompts, answers, base=None, batch: int = 8) -> dict:
    """Mean NLL (and perplexity) of the answers; with `base`, mean KL(base || model) too.

    `base` is a context manager factory giving the base model's view (e.g. the same PEFT
    model with its adapter disabled), or a separate model.
    """
    nll_sum, kl_sum, tokens = 0.0, 0.0, 0
    for input_ids, attention, answer_mask in _batches(tokenizer, prompts, answers, batch):
        target = input_ids[:, 1:]
        mask = answer_mask[:, 1:].bool()  # [B, T-1]
        lp = _log_probs(model, input_ids, attention)
        nll_sum += -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask].sum().item()
        if base is not None:
            with base() as base_model:
                lp_base = _log_probs(base_model, input_ids, attention)
            kl = (lp_base.exp() * (lp_base - lp)).sum(-1)  # [B, T-1]
            kl_sum += kl[mask].sum().item()
        tokens += int(mask.sum())
    out = {"tokens": tokens}
    tokens = max(tokens, 1)
    out |= {"loss": nll_sum / tokens, "perplexity": float(torch.tensor(nll_sum / tokens).exp())}
    if base is not None:
        out["kl_from_base"] = kl_sum / tokens
    return out


def domain_score(
    model, tokenizer, records: list[dict], max_new_tokens: int, system_prompt: str | None = None
) -> dict:
    prompts = [_prompt(r, system_prompt) for r in records]
    answers = generate(model, tokenizer, prompts, max_new_tokens)
    hits = [answer_matches(a, r["answer"]) for a, r in zip(answers, records, strict=True)]
    stats = answer_stats(model, tokenizer, prompts, [r["output"] for r in records])
    return {
        "accuracy": sum(hits) / max(len(hits), 1),
        "correct": sum(hits),
        "total": len(hits),
        "loss": stats["loss"],
        "examples": [
            {"question": p[-1]["content"], "answer": a, "reference": r["answer"], "correct": h}
            for p, a, r, h in list(zip(prompts, answers, records, hits, strict=True))[:5]
        ],
    }


def evaluate_models(
    tuned,
    base_view,
    tokenizer,
    domain_records: list[dict] | None,
    general_prompts: list[list[dict]] | None,
    max_new_tokens: int,
    system_prompt: str | None = None,
    base_numbers: dict | None = None,
) -> dict:
    """Base and tuned numbers side by side. `base_view()` yields the base model.
    `base_numbers`: what depends on the base alone (its domain score, its answers to the
    general prompts and their statistics), reused where it holds them and filled in where
    not, so a cache can keep them for the next model tuned from the same base."""
    base_numbers = {} if base_numbers is None else base_numbers
    report: dict = {}
    if domain_records:
        args = (tokenizer, domain_records, max_new_tokens, system_prompt)
        n = len(domain_records)
        if "domain_base" not in base_numbers:
            with base_view() as base, _phase(f"domain score of the base, {n} questions"):
                base_numbers["domain_base"] = domain_score(base, *args)
        report["domain_base"] = base_numbers["domain_base"]
        with _phase(f"domain score of the tuned model, {n} questions"):
            report["domain"] = domain_score(tuned, *args)
    if general_prompts:
        prompts = general_prompts
        if "general" not in base_numbers:
            with base_view() as base, _phase(f"base answers to {len(prompts)} general prompts"):
                answers = generate(base, tokenizer, prompts, max_new_tokens)
                stats = answer_stats(base, tokenizer, prompts, answers, base=base_view)
            base_numbers["general"] = {"answers": answers, "stats": stats}
        base_answers = base_numbers["general"]["answers"]
        base_stats = base_numbers["general"]["stats"]
        with _phase("drift of the tuned model on those answers"):
            tuned_stats = answer_stats(tuned, tokenizer, prompts, base_answers, base=base_view)
        report["forgetting"] = {
            "prompts": len(prompts),
            "answer_tokens": tuned_stats["tokens"],
            "kl_from_base": tuned_stats["kl_from_base"],
            "kl_base_from_itself": base_stats["kl_from_base"],
            "perplexity_base": base_stats["perplexity"],
            "perplexity_tuned": tuned_stats["perplexity"],
        }
    return report


def base_numbers_file(
    base_fingerprint: str, domain_records, general_prompts, max_new_tokens, system_prompt,
    placement: dict,
) -> Path:  # fmt: skip
    """Where the base's own numbers for these evaluation sets and settings are cached (on
    this node): one file per fingerprint of all that they depend on."""
    body = {
        "base": base_fingerprint, "domain": domain_records, "general": general_prompts,
        "max_new_tokens": max_new_tokens, "system_prompt": system_prompt,
        "dtype": placement["dtype"], "quantization": placement["quantization"],
        "device": placement["device"], "format_version": 1,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return storage.cache_dir() / "eval-base" / f"{key[:32]}.json"


def eval_placement(spec) -> dict:
    """Where and how evaluation holds the models: as the training workers held them, so that
    what trained also evaluates. Adapters: one worker's GPU, in the training dtype, a QLoRA
    base in 4 bits. Full fine-tuning: base and tuned model spread over the GPUs of one node
    (`device: auto`; ZeRO-3 trained them spread over many). On CPUs: fp32."""
    gpu = spec.scaling.use_gpu
    dtype = str(train_dtype(spec.train.precision)).removeprefix("torch.") if gpu else "float32"
    quant = spec.quantization.model_dump() if spec.method == "qlora" else None
    if not gpu:
        return {"device": "cpu", "dtype": dtype, "quantization": quant, "gpus": 0}
    sc, per_node = spec.scaling, spec.cluster.gpus_per_node
    if spec.method == "full":  # the GPUs a node gives its training workers
        gpus = sc.num_workers * sc.gpus_per_worker
        gpus = min(gpus, per_node) if per_node else gpus
        return {"device": "auto", "dtype": dtype, "quantization": None, "gpus": gpus}
    return {"device": "cuda", "dtype": dtype, "quantization": quant, "gpus": sc.gpus_per_worker}


def model_load_kwargs(placement: dict, quantize: bool) -> dict:
    kwargs = {"dtype": getattr(torch, placement["dtype"])}
    if placement["device"] != "cpu":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"evaluation was asked to run on {placement['device']}, but this process sees "
                "no GPU; evaluate where the training workers ran (scaling.use_gpu)"
            )
        # "auto": accelerate spreads the layers over every GPU the task was given
        device = placement["device"]
        kwargs["device_map"] = "auto" if device == "auto" else {"": device}
    q = placement.get("quantization")
    if quantize and q:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"],
            bnb_4bit_use_double_quant=q["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, q["compute_dtype"]),
        )  # fmt: skip
    return kwargs


def load_for_eval(artifact_path: Path, base_path: Path, adapter: bool, placement=None):
    """(tuned model, base-view factory, tokenizer) for an artifact folder, placed as
    `placement` says (`eval_placement`; default: the CPU in fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement or CPU_PLACEMENT
    tokenizer = AutoTokenizer.from_pretrained(artifact_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(base_path, **model_load_kwargs(placement, adapter))
    base.eval()
    if adapter:
        tuned = PeftModel.from_pretrained(base, artifact_path).eval()

        @contextlib.contextmanager
        def base_view():
            with tuned.disable_adapter():
                yield tuned

        return tuned, base_view, tokenizer
    tuned = AutoModelForCausalLM.from_pretrained(
        artifact_path, **model_load_kwargs(placement, False)
    )
    tuned.eval()

    @contextlib.contextmanager
    def base_view():
        yield base

    return tuned, base_view, tokenizer


def evaluate_artifact_folder(
    artifact_path: str,
    base_path: str,
    adapter: bool,
    domain: str | None,
    general: str | None,
    max_new_tokens: int,
    limit: int | None = None,
    system_prompt: str | None = None,
    threads: int | None = None,
    placement: dict | None = None,
    base_fingerprint: str | None = None,
) -> dict:
    """Everything `ftservice eval` reports, for one artifact folder (runs anywhere: the
    driver calls it as a Ray task so it gets the workers' resources; `placement`: the
    device, dtype and quantisation of `eval_placement`). With `base_fingerprint`, the
    base's own numbers are cached on this node and reused for the next model of that base
    (`base_numbers_cached` in the report says whether they were)."""
    if threads:
        torch.set_num_threads(threads)  # Ray tasks start with one intra-op thread
    torch.manual_seed(0)
    placement = placement or CPU_PLACEMENT
    folder = storage.localize(artifact_path)  # a stored artifact: this node's copy
    tuned, base_view, tokenizer = load_for_eval(folder, Path(base_path), adapter, placement)
    domain_records = read_jsonl(domain)[:limit] if domain and Path(domain).is_file() else None
    general_prompts = load_prompts(general, system_prompt)[:limit] if general else None
    cache, base_numbers = None, {}
    if base_fingerprint:
        cache = base_numbers_file(base_fingerprint, domain_records, general_prompts,
                                  max_new_tokens, system_prompt, placement)  # fmt: skip
        if cache.is_file():
            base_numbers = json.loads(cache.read_text())
    cached = set(base_numbers)
    report = evaluate_models(
        tuned, base_view, tokenizer, domain_records, general_prompts, max_new_tokens,
        system_prompt, base_numbers,
    )  # fmt: skip
    if cache is not None and set(base_numbers) != cached:
        storage.write_text(str(cache), json.dumps(base_numbers))
    return report | {
        "memory": peak_memory(placement),
        "base_numbers_cached": bool(cached) and cached == set(base_numbers),
    }


def peak_memory(placement: dict | None) -> dict:
    """This process's peak: resident memory on a CPU, allocated memory on each GPU (what the
    planner's `evaluation_bytes` predicts; the process must be fresh for it to mean that)."""
    peak = {"process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if placement and placement["device"] != "cpu":
        peak["gpu_max_allocated_bytes"] = [
            torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
        ]
    return peak


def load_prompts(path: str, system_prompt: str | None = None) -> list[list[dict]]:
    """The prompt turns of every record of a prompt set: prompt-only data (the `prompts`
    format), or any data with answers, whose answers are left out."""
    prompts = []
    for row in load_rows([path], system_prompt=system_prompt, split="eval"):
        if row["kind"] == "text":
            raise DataError(
                f"{path}: plain text records ({row['id']}) are not prompts; use instructions "
                "without outputs, or chat messages ending in a user turn"
            )
        turns = row["messages"]
        if row["kind"] == "chat":  # up to the last user turn
            users = [i for i, m in enumerate(turns) if m["role"] == "user"]
            if not users:
                raise DataError(f"{path}: record {row['id']} has no user turn to prompt with")
            turns = turns[: users[-1] + 1]
        prompts.append(turns)
    return prompts


def format_report(report: dict) -> str:
    lines = []
    if "domain" in report:
        b, t = report["domain_base"], report["domain"]
        lines.append(
            f"domain score:  {b['accuracy']:.1%} → {t['accuracy']:.1%}  "
            f"({b['correct']} → {t['correct']} of {t['total']} held-out questions)"
        )
        lines.append(f"domain loss:   {b['loss']:.3f} → {t['loss']:.3f}")
    if "forgetting" in report:
        f = report["forgetting"]
        lines.append(
            f"forgetting:    KL(base‖tuned) {f['kl_from_base']:.4f} nats/token over "
            f"{f['prompts']} general prompts (base vs itself {f['kl_base_from_itself']:.4f})"
        )
        lines.append(
            f"               perplexity of base answers {f['perplexity_base']:.2f} → "
            f"{f['perplexity_tuned']:.2f}"
        )
    return "\n".join(lines)
