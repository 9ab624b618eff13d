"""The model engine of a serving replica: ONE copy of the base with adapters loaded into it,
and generation that serves requests for different adapters in one batch.

Adapters live in slots, as S-LoRA and Punica keep them: for every Linear layer some adapter
adapts, A of every slot stacked in one tensor [slots, in, r] and B (times the adapter's
scaling) in [slots, r, out], slot 0 all zeros for the base. A forward hook on the base's
Linear adds each row's own LoRA term with one gathered batched matmul, so a batch whose
rows use different adapters costs about what a batch of one adapter costs. (PEFT's per-row
`adapter_names` does the same arithmetic in a Python loop over the batch's adapters in every
layer: 0.76x the single-adapter throughput at 8 adapters here, against this path's figure
in benchmarks/README.md.) Loading reads the adapter's safetensors into a free slot; no
module is built, so a cold load costs about a file read.

HF `generate` takes one sampling configuration per call, so rows sample on their own: a
logits processor draws each sampled row's next token with the row's temperature, top-p and
seeded generator and leaves that token as the row's only choice, and greedy search takes it.
Rows of any sampling settings (and seeds) share one batch; each row also keeps its own
token cap and stop strings (a per-row stopping criterion) and its own stream.

Adapters are held LRU: loading one past `max_adapters` evicts the least recently used (its
slot is zeroed and reused), so memory stays one base plus `max_adapters` slots; with no
adapter left the hooks and slots are removed and the model is the plain base again.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
)

LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
"""How PEFT saves a LoRA weight: the adapted module's path in the base, then A or B (the
gate checks shapes with the same pattern)."""


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


class _RowSampler(LogitsProcessor):
    """Each sampled row draws its next token with its own temperature, top-p (as HF's
    TopPLogitsWarper keeps tokens) and generator, seeded by the request (the same seed gives
    the same answer, whatever else is in the batch); the drawn token is left as the row's
    only finite score, so greedy search takes it. Greedy rows keep their scores."""

    def __init__(self, rows: list[GenerationRequest]):
        self.rows = []
        for i, r in enumerate(rows):
            if r.temperature > 0:
                gen = torch.Generator()
                gen.manual_seed(r.seed if r.seed is not None else torch.seed())
                self.rows.append((i, r.temperature, r.top_p, gen))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
        if not self.rows:
            return scores
        out = scores.clone()
        for i, temperature, top_p, gen in self.rows:
            logits = scores[i].float() / temperature
            if top_p < 1:
                ordered, order = torch.sort(logits)
                cut = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
                cut[-1] = False  # the likeliest token always stays
                logits = logits.masked_fill(cut.scatter(0, order, cut), -math.inf)
            token = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen).item()
            out[i] = -math.inf
            out[i, token] = 0.0
        return out


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


class LoraSlots:
    """The LoRA weights of one base Linear for slots 1..n, side by side: A [in, n·r] and
    B·scaling [n·r, out], slot k in columns (rows of B) (k-1)·r .. k·r. r grows to the largest
    rank loaded (lower ranks are zero-padded). A mixed batch runs x @ A, keeps each row's own
    slot block (a mask), and multiplies by B: two dense matmuls, no per-row weight copies."""

    def __init__(self, linear: torch.nn.Linear, slots: int, rank: int):
        kw = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        self.n, self.rank = slots, rank
        self.A = torch.zeros(linear.in_features, slots * rank, **kw)
        self.B = torch.zeros(slots * rank, linear.out_features, **kw)

    def block(self, slot: int) -> slice:
        return slice((slot - 1) * self.rank, slot * self.rank)

    def view(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot's A [in, r] and scaled B [r, out] (views)."""
        cols = self.block(slot)
        return self.A[:, cols], self.B[cols]

    def fit(self, rank: int) -> None:
        if rank > self.rank:
            grow, n = rank - self.rank, self.n
            a = self.A.reshape(self.A.shape[0], n, self.rank)
            self.A = torch.nn.functional.pad(a, (0, grow)).reshape(self.A.shape[0], n * rank)
            b = self.B.reshape(n, self.rank, self.B.shape[1])
            self.B = torch.nn.functional.pad(b, (0, 0, 0, grow)).reshape(n * rank, -1)
            self.rank = rank

    def clear(self, slot: int) -> None:
        for t in self.view(slot):
            t.zero_()


def unsupported_lora_features(config: dict) -> list[str]:
    """What an adapter_config.json asks for that the slots cannot compute exactly."""
    found = [
        what
        for what, used in [
            ("DoRA (use_dora)", config.get("use_dora")),
            ("trained biases (bias)", config.get("bias", "none") != "none"),
            ("modules_to_save", config.get("modules_to_save")),
            ("per-module ranks or alphas (rank_pattern, alpha_pattern)",
             config.get("rank_pattern") or config.get("alpha_pattern")),
            ("fan_in_fan_out", config.get("fan_in_fan_out")),
        ]
        if used
    ]  # fmt: skip
    if config.get("peft_type", "LORA") != "LORA":
        found.append(f"peft_type {config['peft_type']}")
    return found


def read_lora(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{module path: (A [r, in], B [out, r])} and the scaling of a PEFT LoRA adapter; what
    the slots cannot hold exactly is refused with the reason."""
    config = json.loads((folder / "adapter_config.json").read_text())
    unsupported = unsupported_lora_features(config)
    if unsupported:
        raise ValueError(
            f"{folder.name}: this engine serves plain LoRA adapters; this one uses "
            f"{', '.join(unsupported)}"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(folder / "adapter_model.safetensors").items():
        m = LORA_KEY.match(key)
        if m is None:
            raise ValueError(f"{folder.name}: unexpected tensor {key} (not a LoRA A or B)")
        pairs.setdefault(m.group("module"), {})[m.group("part")] = tensor
    rank = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return {path: (ab["A"], ab["B"]) for path, ab in pairs.items()}, scaling


class Engine:
    def __init__(self, base_path: str | Path, max_adapters: int = 8, dtype=torch.float32):
        self.base_path = Path(base_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.base_path, dtype=dtype)
        self.model.eval()
        self.max_adapters = max_adapters
        self.adapters: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU order
        self.slots: dict[str, LoraSlots] = {}  # module path -> its LoRA slots
        self._hooks: list = []
        self._free = list(range(1, max_adapters + 1))  # slot 0 is the base; lowest first
        self._rows: torch.Tensor | None = None  # the slot of each row of this forward
        self._one_slot: int | None = None  # set when every row uses the same slot
        self._top = 0  # the highest slot of this forward's rows (columns past it are unused)
        self._masks: dict[int, torch.Tensor] = {}  # rank -> each row's slot block, this call
        self._lock = threading.Lock()  # generation, loading and deleting never overlap
        self.stats = EngineStats()

    # ---- adapters ---------------------------------------------------------------------------

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load an adapter into a slot (a no-op when held; refreshes its LRU place)."""
        with self._lock:
            if name in self.adapters:
                self.adapters.move_to_end(name)
                return
        weights, scaling = read_lora(Path(folder))  # the file read, outside the lock
        with self._lock:
            if name in self.adapters:
                return
            if not self._free:
                self._evict(next(iter(self.adapters)))
            slot = self._free.pop(0)
            try:
                for path, (a, b) in weights.items():
                    lora = self._slots_for(path, a.shape[0])
                    slot_a, slot_b = lora.view(slot)
                    slot_a[:, : a.shape[0]] = a.T
                    slot_b[: b.shape[1], :] = b.T * scaling
            except Exception:  # nothing half-loaded stays: the slot is cleared and free again
                for lora in self.slots.values():
                    lora.clear(slot)
                bisect.insort(self._free, slot)
                raise
            self.adapters[name] = slot
            self.stats.adapter_loads += 1

    def _slots_for(self, path: str, rank: int) -> LoraSlots:
        if path not in self.slots:
            linear = self.model.get_submodule(path)
            if not isinstance(linear, torch.nn.Linear):
                raise ValueError(f"{path} is a {type(linear).__name__}, not a Linear layer")
            self.slots[path] = LoraSlots(linear, self.max_adapters, rank)
            self._hooks.append(linear.register_forward_hook(self._lora_hook(self.slots, path)))
        self.slots[path].fit(rank)
        return self.slots[path]

    def _lora_hook(self, slots: dict[str, LoraSlots], path: str):
        def hook(module, args, output):
            if self._rows is None or self._one_slot == 0:
                return None
            lora, x = slots[path], args[0]  # x [batch, seq, in]
            if self._one_slot is not None:
                a, b = lora.view(self._one_slot)
                return output + (x @ a) @ b
            cols = self._top * lora.rank
            xa = x @ lora.A[:, :cols]  # [batch, seq, top·r]: every used slot's down-projection
            return output + (xa * self._mask(lora.rank)) @ lora.B[:cols]

        return hook

    def unload_adapter(self, name: str) -> bool:
        with self._lock:
            if name not in self.adapters:
                return False
            self._evict(name)
            return True

    def _evict(self, name: str) -> None:
        slot = self.adapters.pop(name)
        for lora in self.slots.values():
            lora.clear(slot)
        bisect.insort(self._free, slot)
        self.stats.adapter_evictions += 1
        if not self.adapters:  # the plain base again: no hooks, no slots
            for handle in self._hooks:
                handle.remove()
            self._hooks, self.slots = [], {}

    def _route(self, rows: list[GenerationRequest]) -> None:
        """Which slot each row of the next forward passes uses."""
        slots = [self.adapters[r.adapter] if r.adapter else 0 for r in rows]
        self._rows = torch.tensor(slots, device=self.model.device)
        self._one_slot = slots[0] if len(set(slots)) == 1 else None
        self._top, self._masks = max(slots), {}

    def _mask(self, rank: int) -> torch.Tensor:
        """[batch, 1, top·rank]: 1 in each row's own slot block, 0 elsewhere (base rows: 0)."""
        if rank not in self._masks:
            block = torch.arange(self._top * rank, device=self._rows.device) // rank + 1
            mask = (block[None, :] == self._rows[:, None]).to(self.model.dtype)
            self._masks[rank] = mask[:, None, :]
        return self._masks[rank]

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
        with self._lock:
            return self._generate_batch(requests)

    def _generate_batch(self, rows: list[GenerationRequest]) -> list[Generation]:
        tok = self.tokenizer
        batch = tok.pad(
            {"input_ids": [r.prompt_ids for r in rows]}, padding_side="left", return_tensors="pt"
        )
        prompt_len = batch["input_ids"].shape[1]
        for r in rows:
            if r.adapter:
                self.adapters.move_to_end(r.adapter)
        self._route(rows)
        try:
            return self._generate_rows(rows, batch, prompt_len)
        finally:
            self._rows = self._one_slot = None
            self._masks = {}

    def _generate_rows(self, rows, batch, prompt_len) -> list[Generation]:
        tok = self.tokenizer
        mixed = len({r.adapter for r in rows}) > 1
        limits = _RowLimits(self, rows, prompt_len, mixed)
        want_logprobs = any(r.logprobs is not None for r in rows)
        prompt_scores = self._prompt_logprobs(batch) if any(r.echo_logprobs for r in rows) else None
        longest = max(r.max_new_tokens for r in rows)
        if longest == 0:  # scoring only
            out, logits = batch["input_ids"], []
        else:
            self.stats.generate_calls += 1
            generated = self.model.generate(
                **batch,
                max_new_tokens=longest,
                stopping_criteria=[limits],
                logits_processor=LogitsProcessorList([_RowSampler(rows)]),
                do_sample=False,  # greedy over what _RowSampler leaves: rows sample alone
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                output_logits=want_logprobs,
                return_dict_in_generate=True,
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

    def _prompt_logprobs(self, batch) -> list[list[float]]:
        """Per row, the log-probability of each (left-padded) prompt token after the ones
        before it: [batch, prompt_len - 1]."""
        # positions count real tokens only, so a left-padded row scores as it would alone
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**batch, position_ids=positions).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        picked = lp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # [batch, len - 1]
        return picked.tolist()
