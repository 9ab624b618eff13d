"""Replay of the base model's own behaviour, against forgetting (`data.replay`).

Reads top to bottom: the replay prompts and the base model fingerprint the cached answers
(another base, other prompts or other settings: another file); a missing file is made once
by a Ray task that loads the base as evaluation would (the worker's GPU and dtype, a QLoRA
base in 4 bits, fp32 on CPUs) and answers every prompt greedily; the worker mixes those
answers into the training rows so that they are the spec's share of the examples (SFT), or
draws them beside each step's preference pairs in that share (DPO, `dpo.py`).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass

from ftservice import storage
from ftservice.config import JobSpec, ReplaySpec
from ftservice.data.loaders import DataError
from ftservice.evaluate import eval_placement, generate, load_prompts, model_load_kwargs
from ftservice.models import ResolvedModel, load_causal_lm, load_tokenizer
from ftservice.raycluster import own_task
from ftservice.train.common import cpu_threads


@dataclass(frozen=True)
class ReplaySet:
    location: str
    """The cached JSONL (chat records: the prompt turns and the base's answer)."""
    fingerprint: str
    examples: int
    made: bool
    """Whether this call made it (False: it was in the cache)."""


def replay_fingerprint(
    base: ResolvedModel, prompts_text: str, replay: ReplaySpec, system_prompt, placement
) -> str:
    """sha256 of what the answers depend on: the base's weights, the prompts, the system
    prompt, the answer length and how the base was held (dtype, 4 bits)."""
    body = {
        "base": base.fingerprint,
        "prompts": hashlib.sha256(prompts_text.encode()).hexdigest(),
        "system_prompt": system_prompt,
        "max_new_tokens": replay.max_new_tokens,
        "dtype": placement["dtype"],
        "quantization": placement["quantization"],
        "format_version": 1,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def replay_folder(spec: JobSpec) -> str:
    replay = spec.data.replay
    return replay.cache or storage.join(spec.output.storage_path, "replay")


def base_answers(
    base: ResolvedModel, prompts: list[list[dict]], max_new_tokens: int, placement, threads
) -> list[str]:
    """The base model's greedy answers (runs as a Ray task with the placement's GPUs)."""
    import torch

    if threads:
        torch.set_num_threads(threads)  # Ray tasks start with one intra-op thread
    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(base, **model_load_kwargs(placement, quantize=True)).eval()
    return generate(model, tokenizer, prompts, max_new_tokens)


def ensure_replay(spec: JobSpec, base: ResolvedModel) -> ReplaySet:
    """The base's answers to the replay prompts: from the cache, or made now and cached."""
    replay = spec.data.replay
    if not storage.is_file(replay.prompts):
        raise DataError(
            f"data.replay.prompts: {replay.prompts} does not exist; give a prompt set "
            "(data/general/replay.jsonl ships with ftservice)"
        )
    placement = eval_placement(spec)
    text = storage.read_text(replay.prompts)
    fp = replay_fingerprint(base, text, replay, spec.data.system_prompt, placement)
    location = storage.join(replay_folder(spec), f"replay-{fp[:16]}.jsonl")
    if storage.is_file(location):
        examples = sum(1 for line in storage.read_text(location).splitlines() if line.strip())
        return ReplaySet(location, fp, examples, made=False)
    prompts = load_prompts(storage.localize(replay.prompts), spec.data.system_prompt)
    print(
        f"ftservice: replay: the base answers {len(prompts)} prompts of {replay.prompts} "
        f"(once per base; cached at {location})",
        file=sys.stderr,
    )
    start = time.perf_counter()
    answers = _answer_remote(spec, base, prompts, placement)
    records = [
        {"messages": [*p, {"role": "assistant", "content": a}]}
        for p, a in zip(prompts, answers, strict=True)
        if a.strip()  # an empty answer has nothing to learn or to match
    ]
    storage.write_text(location, "".join(json.dumps(r) + "\n" for r in records))
    print(
        f"ftservice: replay: {len(records)} answers in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    return ReplaySet(location, fp, len(records), made=True)


def _answer_remote(spec: JobSpec, base: ResolvedModel, prompts, placement) -> list[str]:
    import ray

    task = own_task(base_answers, spec.scaling.cpus_per_worker, placement["gpus"])
    max_new_tokens = spec.data.replay.max_new_tokens
    return ray.get(task.remote(base, prompts, max_new_tokens, placement, cpu_threads(spec)))


def replay_rows(location: str) -> list[dict]:
    """The cached answers as training rows (chat), each marked `replay`."""
    rows = []
    for i, line in enumerate(storage.read_text(location).splitlines()):
        if line.strip():
            record = json.loads(line)
            rows.append(
                {"kind": "chat", "messages": record["messages"], "id": f"replay:{i + 1}",
                 "replay": True}
            )  # fmt: skip
    return rows


def replay_share(n: int, replay: list[dict], ratio: float, seed: int) -> list[dict]:
    """The replay rows that are `ratio` of the whole beside `n` rows: round(n·r/(1−r)) of
    them, in a seeded order, each replay row used once before any is used again."""
    if not replay:
        return []
    wanted = round(n * ratio / (1 - ratio))
    order = list(range(len(replay)))
    random.Random(seed).shuffle(order)
    return [replay[order[i % len(order)]] for i in range(wanted)]


def mix_replay(rows: list[dict], replay: list[dict], ratio: float, seed: int) -> list[dict]:
    """`rows` with their share of replay rows added (`replay_share`)."""
    return [*rows, *replay_share(len(rows), replay, ratio, seed)]
