"""The model engine of a serving replica: ONE copy of the base with adapters loaded into it,
and generation that serves requests for different adapters in one batch.

PEFT runs a batch whose rows use different adapters in one forward pass (`adapter_names`,
one per row, "__base__" for the base), so requests are never serialised behind
`set_adapter` nor race on it. HF `generate` takes one sampling configuration per call, so a
batch is split into groups whose sampling settings agree; each row keeps its own token cap
and stop strings (a per-row stopping criterion) and its own stream.

Adapters are held LRU: loading one past `max_adapters` deletes the least recently used from
the model (`delete_adapter`), so memory stays one base plus at most `max_adapters` adapters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None = None
    """An adapter loaded with `load_adapter`, or None for the base."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None
    """Called with each new piece of text as it is generated (streaming)."""
    logprobs: int | None = None
    """Log-probabilities of the generated tokens, and this many top alternatives per step."""
    echo_logprobs: bool = False
    """Log-probabilities of the prompt's own tokens (scoring, as evaluation harnesses ask)."""

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call."""
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p, self.seed)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    """'stop' (end of sequence or a stop string) or 'length' (the token cap)."""
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    """Per prompt token; the first has no context, so None."""


@dataclass
class EngineStats:
    generate_calls: int = 0
    forward_passes: int = 0
    mixed_forward_passes: int = 0
    """Forward passes whose batch held rows of two or more adapters (the base counts as one)."""
    adapter_loads: int = 0
    adapter_evictions: int = 0
    largest_batch: int = 0
    """Most requests one `generate` call was given."""


class _RowLimits(StoppingCriteria):
    """Per-row stop: its own token cap and stop strings; also counts forward passes."""

    def __init__(self, engine: Engine, rows: list[GenerationRequest], prompt_len: int, mixed):
        self.engine, self.rows, self.prompt_len, self.mixed = engine, rows, prompt_len, mixed
        self.sent = [""] * len(rows)  # text already streamed per row
        self.done = [False] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stats = self.engine.stats
        stats.forward_passes += 1
        stats.mixed_forward_passes += int(self.mixed)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for i, row in enumerate(self.rows):
            if self.done[i]:
                finished[i] = True
                continue
            new = input_ids[i, self.prompt_len :].tolist()
            text, hit_eos = self.engine.decode_new(new)
            cut = _first_stop(text, row.stop)
            if cut is not None:
                text = text[:cut]
            if row.on_text is not None and len(text) > len(self.sent[i]):
                # hold back what may be the start of a stop string
                hold = 0 if cut is not None or hit_eos else _stop_prefix(text, row.stop)
                piece = text[len(self.sent[i]) : len(text) - hold]
                if piece:
                    row.on_text(piece)
                    self.sent[i] += piece
            if cut is not None or hit_eos or len(new) >= row.max_new_tokens:
                self.done[i] = True
                finished[i] = True
        return finished


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


class Engine:
    def __init__(self, base_path: str | Path, max_adapters: int = 8, dtype=torch.float32):
        self.base_path = Path(base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=dtype)
        self.model.eval()
        self.max_adapters = max_adapters
        self.adapters: OrderedDict[str, str] = OrderedDict()  # name -> PEFT's name, LRU order
        self._serial = 0
        self._lock = threading.Lock()  # generation, loading and deleting never overlap
        self.stats = EngineStats()

    # ---- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load an adapter into the one base (a no-op when held; refreshes its LRU place)."""
        from peft import PeftModel

        with self._lock:
            if name in self.adapters:
                self.adapters.move_to_end(name)
                return
            # PEFT re-initialises adapters whose names occur inside 'lora_' (e.g. 'a'):
            # the model's own names are neutral serials, ours map to them
            self._serial += 1
            inner = f"adapter{self._serial}"
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=inner)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=inner)
                self.model.eval()
            self.adapters[name] = inner
            self.stats.adapter_loads += 1
            while len(self.adapters) > self.max_adapters:
                self._delete(next(iter(self.adapters)))

    def unload_adapter(self, name: str) -> bool:
        with self._lock:
            if name not in self.adapters:
                return False
            self._delete(name)
            return True

    def _delete(self, name: str) -> None:
        inner = self.adapters.pop(name)
        if not self.adapters:
            # the last adapter: back to the plain base (PEFT needs one adapter to exist)
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(inner)
        self.stats.adapter_evictions += 1

    def loaded_adapters(self) -> list[str]:
        return list(self.adapters)

    # ---- generation -------------------------------------------------------------------------

    def decode_new(self, token_ids: list[int]) -> tuple[str, bool]:
        """Text of generated tokens up to end-of-sequence, and whether it was reached."""
        eos = self.tokenizer.eos_token_id
        hit = eos in token_ids
        if hit:
            token_ids = token_ids[: token_ids.index(eos)]
        pad = self.tokenizer.pad_token_id
        token_ids = [t for t in token_ids if t != pad]
        return self.tokenizer.decode(token_ids, skip_special_tokens=True), hit

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Every request's generation; requests for different adapters share forward passes
        when their sampling settings agree."""
        unknown = sorted(
            {r.adapter for r in requests if r.adapter and r.adapter not in self.adapters}
        )
        if unknown:
            raise KeyError(f"adapters not loaded: {', '.join(unknown)}")
        self.stats.largest_batch = max(self.stats.largest_batch, len(requests))
        results: list[Generation | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.sampling_key(), []).append(i)
        with self._lock:
            for key, index in groups.items():
                generated = self._generate_group([requests[i] for i in index], key)
                for i, gen in zip(index, generated, strict=True):
                    results[i] = gen
        return results  # type: ignore[return-value]

    def _generate_group(self, rows: list[GenerationRequest], key: tuple) -> list[Generation]:
        tok = self.tokenizer
        batch = tok.pad(
            {"input_ids": [r.prompt_ids for r in rows]}, padding_side="left", return_tensors="pt"
        )
        prompt_len = batch["input_ids"].shape[1]
        for r in rows:
            if r.adapter:
                self.adapters.move_to_end(r.adapter)
        names = [self.adapters[r.adapter] if r.adapter else BASE for r in rows]
        mixed = len(set(names)) > 1
        limits = _RowLimits(self, rows, prompt_len, mixed)
        kwargs = {}
        if self.adapters:
            kwargs["adapter_names"] = names
        if key[0] == "sample":
            _, temperature, top_p, seed = key
            kwargs |= {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        want_logprobs = any(r.logprobs is not None for r in rows)
        prompt_scores = (
            self._prompt_logprobs(batch, kwargs) if any(r.echo_logprobs for r in rows) else None
        )
        longest = max(r.max_new_tokens for r in rows)
        if longest == 0:  # scoring only
            out, logits = batch["input_ids"], []
        else:
            self.stats.generate_calls += 1
            generated = self.model.generate(
                **batch,
                max_new_tokens=longest,
                stopping_criteria=[limits],
                pad_token_id=tok.pad_token_id,
                output_logits=want_logprobs,
                return_dict_in_generate=True,
                **kwargs,
            )
            out, logits = generated.sequences, list(generated.logits or [])
        results = []
        for i, r in enumerate(rows):
            new = out[i, prompt_len:].tolist()
            text, hit_eos = self.decode_new(new)
            cut = _first_stop(text, r.stop)
            if hit_eos:
                new = new[: new.index(tok.eos_token_id)]
            new = [t for t in new if t != tok.pad_token_id][: r.max_new_tokens]
            if cut is not None:
                text = text[:cut]
            if r.on_text is not None and len(text) > len(limits.sent[i]):
                r.on_text(text[len(limits.sent[i]) :])  # what was held back, at the end
            stopped = hit_eos or cut is not None
            gen = Generation(
                text=text,
                token_ids=new,
                finish_reason="stop" if stopped else "length",
                prompt_tokens=len(r.prompt_ids),
                completion_tokens=len(new),
            )
            if r.logprobs is not None:
                steps = [torch.log_softmax(logits[t][i].float(), -1) for t in range(len(new))]
                gen.token_logprobs = [float(lp[tid]) for lp, tid in zip(steps, new, strict=True)]
                if r.logprobs > 0:
                    tops = [torch.topk(lp, r.logprobs) for lp in steps]
                    gen.top_logprobs = [
                        dict(zip(t.indices.tolist(), t.values.tolist(), strict=True)) for t in tops
                    ]
            if r.echo_logprobs and prompt_scores is not None:
                n = len(r.prompt_ids)
                gen.prompt_logprobs = [None, *prompt_scores[i][prompt_len - n :]]
            results.append(gen)
        return results

    def _prompt_logprobs(self, batch, kwargs) -> list[list[float]]:
        """Per row, the log-probability of each (left-padded) prompt token after the ones
        before it: [batch, prompt_len - 1]."""
        extra = {"adapter_names": kwargs["adapter_names"]} if "adapter_names" in kwargs else {}
        # positions count real tokens only, so a left-padded row scores as it would alone
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**batch, position_ids=positions, **extra).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        picked = lp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # [batch, len - 1]
        return picked.tolist()
