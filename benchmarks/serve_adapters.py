"""Serving many adapters on one base: ftservice's engine against the patterns peers use, side
by side in one run, on the built-in SmolLM2-135M with 8 written LoRA adapters (rank 16, every
linear layer, random non-zero B, so each answers differently).

1. Switching: latency (p50/p99) of a one-token request for an adapter that is warm (loaded
   in the one base), cold (loaded from disk into the base first, then evicted), and the
   reload pattern (a whole PeftModel loaded for the request: base + adapter).
2. Throughput at concurrency 8 with 1 adapter against 8 adapters under Zipf traffic
   (S-LoRA's setting, exponent 1): goal >= 0.8x.
3. Mixed-adapter batches against the pattern of Ray's multiplexing docs: one PeftModel per
   adapter id, and batches split by adapter (what `@serve.batch` does with multiplexing),
   run one after another; 8 adapters, uniform traffic, concurrency 8. Goals: >= 2x the
   throughput, and memory <= 1.1x one model where copies take ~8x.

Each configuration runs in its own process (peak memory is that process tree's PSS), with
one torch thread as a serving replica has. Prints JSON; `benchmarks/README.md` has a run.

    .venv/bin/python benchmarks/serve_adapters.py [--requests 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTERS = 8
CONCURRENCY = 8
PROMPTS = [
    "What is the warranty period for the Model X kettle?",
    "Where is the company's headquarters?",
    "How do I reset my account password?",
    "Which payment methods do you accept?",
    "What are the opening hours of the support line?",
    "Can I return a product after thirty days?",
    "Does the blender come with spare blades?",
    "How long does delivery to Norway take?",
]


def base_path() -> Path:
    from ftservice.config import ModelSpec
    from ftservice.models import resolve_model

    return resolve_model(ModelSpec(name="smollm2-135m-instruct")).path


def write_adapters(root: Path, base: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(model, config)
    folders = []
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        folder = root / f"adapter{i}"
        peft.save_pretrained(folder)
        folders.append(folder)
    return folders


def prompt_ids(tokenizer, i: int) -> list[int]:
    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def traffic(n: int, adapters: int, zipf: bool, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(adapters)] if zipf else [1.0] * adapters
    return rng.choices(range(adapters), weights=weights, k=n)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def closed_loop(run_batch, requests: list, concurrency: int, batch: int) -> float:
    """`concurrency` clients, each sending its next request when the last one returns,
    through ftservice's batcher; returns the wall seconds for all of them."""
    from ftservice.serve.batcher import Batcher

    batcher = Batcher(run_batch, batch, 0.01)
    queue = list(requests)

    async def client():
        while queue:
            await batcher.submit(queue.pop())

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start


def held_mib(engines) -> float:
    """Tensor bytes the engines hold (weights, buffers, adapter slots): what a GPU would
    hold. On CPU, copies of a model loaded from the same safetensors file can share the
    file's pages (mmap), so the process's PSS may count them once."""
    seen, total = set(), 0
    for e in engines:
        tensors = [*e.model.parameters(), *e.model.buffers()]
        tensors += [t for s in e.slots.values() for t in (s.A, s.B)]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return round(total / 2**20, 1)


def models_mib(models) -> float:
    """Tensor bytes of whole models (each PeftModel copy holds its own base)."""
    total = sum(t.nbytes for m in models for t in [*m.parameters(), *m.buffers()])
    return round(total / 2**20, 1)


def throughput_run(args, mode: str) -> dict:
    """One throughput configuration: ours (one base, adapters in it, mixed batches) or
    copies (a PeftModel per adapter, batches split by adapter, run one after another)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftservice.serve.engine import Engine, Generation, GenerationRequest

    base, folders = Path(args.base), [Path(f) for f in args.adapters]
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_adapters = 1 if mode == "ours-1" else ADAPTERS
    order = traffic(args.requests, n_adapters, zipf=not mode.endswith("uniform"))
    if mode in ("ours-1", "ours-8-zipf", "ours-8-uniform"):
        engine = Engine(base, max_adapters=ADAPTERS)
        for i in range(n_adapters):
            engine.load_adapter(f"a{i}", folders[i])
        run, engines = engine.generate, [engine]
    elif mode == "copies-8-uniform":
        # Ray's multiplexing docs: a whole PeftModel per adapter id, each batch one adapter's
        copies = [
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(folders[i])
            ).eval()
            for i in range(ADAPTERS)
        ]

        def run(rows):
            out = [None] * len(rows)
            by_adapter: dict[int, list[int]] = {}
            for j, r in enumerate(rows):
                by_adapter.setdefault(int(r.adapter[1:]), []).append(j)
            for a, idx in by_adapter.items():  # one adapter's batch after another
                batch = tokenizer.pad(
                    {"input_ids": [rows[j].prompt_ids for j in idx]},
                    padding_side="left",
                    return_tensors="pt",
                )
                with torch.no_grad():
                    seqs = copies[a].generate(
                        **batch,
                        max_new_tokens=max(rows[j].max_new_tokens for j in idx),
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                for k, j in enumerate(idx):
                    new = seqs[k, batch["input_ids"].shape[1] :].tolist()
                    if tokenizer.eos_token_id in new:
                        new = new[: new.index(tokenizer.eos_token_id)]
                    out[j] = Generation("", new, "", len(rows[j].prompt_ids), len(new))
            return out

        engines = []
    else:
        raise ValueError(mode)
    requests = [
        GenerationRequest(prompt_ids(tokenizer, i), f"a{a}", max_new_tokens=args.new_tokens)
        for i, a in enumerate(order)
    ]
    results = []

    def counted(rows):
        out = run(rows)
        results.extend(out)
        return out

    asyncio.run(closed_loop(counted, requests[:CONCURRENCY], CONCURRENCY, CONCURRENCY))  # warm
    results.clear()
    seconds = asyncio.run(closed_loop(counted, requests, CONCURRENCY, CONCURRENCY))
    tokens = sum(g.completion_tokens for g in results)
    return {
        "mode": mode,
        "requests": len(results),
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "adapters_used": len(set(order)),
        "tensor_mib": held_mib(engines) if engines else models_mib(copies),
    }


def switch_run(args) -> dict:
    """Latency of a one-token request for a warm adapter, a cold one, and a whole reload."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftservice.serve.engine import Engine, GenerationRequest

    base, folders = Path(args.base), [Path(f) for f in args.adapters]
    engine = Engine(base, max_adapters=ADAPTERS)
    for i in range(ADAPTERS - 1):
        engine.load_adapter(f"a{i}", folders[i])
    ids = prompt_ids(engine.tokenizer, 0)
    rng = random.Random(0)

    def one(name):
        engine.generate([GenerationRequest(ids, name, max_new_tokens=1)])

    one("a0")
    warm, cold, reload = [], [], []
    for _ in range(args.warm):
        name = f"a{rng.randrange(ADAPTERS - 1)}"
        t = time.perf_counter()
        one(name)
        warm.append(time.perf_counter() - t)
    cold_name, cold_folder = f"a{ADAPTERS - 1}", folders[ADAPTERS - 1]
    for _ in range(args.cold):
        t = time.perf_counter()
        engine.load_adapter(cold_name, cold_folder)
        one(cold_name)
        cold.append(time.perf_counter() - t)
        engine.unload_adapter(cold_name)
    for k in range(args.reloads):
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(folders[k % ADAPTERS])).eval()
        with torch.no_grad():
            model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)
        reload.append(time.perf_counter() - t)
        del model

    def summary(xs):
        return {
            "n": len(xs),
            "p50_ms": round(1000 * statistics.median(xs), 1),
            "p99_ms": round(1000 * pct(xs, 0.99), 1),
        }

    out = {"warm": summary(warm), "cold": summary(cold), "reload_peftmodel": summary(reload)}
    out["cold_over_warm_p50"] = round(out["cold"]["p50_ms"] / out["warm"]["p50_ms"], 1)
    out["reload_over_warm_p50"] = round(
        out["reload_peftmodel"]["p50_ms"] / out["warm"]["p50_ms"], 1
    )
    return out


def base_only_run(args) -> dict:
    """One base and nothing else: the memory every other configuration is compared with."""
    from ftservice.serve.engine import Engine, GenerationRequest

    engine = Engine(Path(args.base), max_adapters=ADAPTERS)
    ids = prompt_ids(engine.tokenizer, 0)
    engine.generate([GenerationRequest(ids, None, max_new_tokens=args.new_tokens)] * CONCURRENCY)
    return {"mode": "base", "tensor_mib": held_mib([engine])}


def child(args) -> None:
    import torch

    torch.set_num_threads(1)  # as a serving replica on a small machine runs
    if args.child == "switch":
        out = switch_run(args)
    elif args.child == "base":
        out = base_only_run(args)
    else:
        out = throughput_run(args, args.child)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--cold", type=int, default=30)
    parser.add_argument("--reloads", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(HERE))
    from _measure import measure

    base = base_path()
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_adapters(Path(tmp), base)
        common = [
            f"--requests={args.requests}", f"--new-tokens={args.new_tokens}",
            f"--warm={args.warm}", f"--cold={args.cold}", f"--reloads={args.reloads}",
            f"--base={base}", "--adapters", *map(str, folders),
        ]  # fmt: skip
        runs = {}
        for mode in ("base", "switch", "ours-1", "ours-8-zipf", "ours-8-uniform",
                     "copies-8-uniform"):  # fmt: skip
            m = measure([sys.executable, __file__, f"--child={mode}", *common])
            [line] = [x for x in m["stdout"].splitlines() if x.startswith("RESULT ")]
            runs[mode] = json.loads(line[7:]) | {"peak_mib": m["peak_mib"]}
            print(f"{mode}: {json.dumps(runs[mode])}", file=sys.stderr, flush=True)

    def tps(mode):
        return runs[mode]["tokens_per_s"]

    base_mib = runs["base"]["peak_mib"]
    report = {
        "model": "smollm2-135m-instruct (fp32)",
        "adapters": "8 x LoRA r=16, every linear layer",
        "concurrency": CONCURRENCY,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "switching": runs["switch"],
        "throughput": {m: runs[m] for m in runs if m not in ("base", "switch")},
        "ratios": {
            "zipf8_over_single_adapter": round(tps("ours-8-zipf") / tps("ours-1"), 2),
            "mixed_batches_over_copies_uniform8": round(
                tps("ours-8-uniform") / tps("copies-8-uniform"), 2
            ),
            "memory_ours8_over_one_model": round(runs["ours-8-uniform"]["peak_mib"] / base_mib, 2),
            "memory_copies8_over_one_model": round(
                runs["copies-8-uniform"]["peak_mib"] / base_mib, 2
            ),
            "tensors_ours8_over_one_model": round(
                runs["ours-8-uniform"]["tensor_mib"] / runs["base"]["tensor_mib"], 2
            ),
            "tensors_copies8_over_one_model": round(
                runs["copies-8-uniform"]["tensor_mib"] / runs["base"]["tensor_mib"], 2
            ),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
