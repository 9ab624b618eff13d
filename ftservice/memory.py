"""The memory planner: will a job fit, and on what?

Per device (GPU, or the worker process on a CPU), in bytes, for one method and stage:
- weights: the frozen or trained parameters as they sit in memory (bf16, fp32, or 4-bit NF4
  with its quantisation constants; QLoRA keeps the unquantised layers in fp32, as PEFT's
  `prepare_model_for_kbit_training` casts them);
- gradients and optimizer states (AdamW: fp32 moments, and fp32 master weights for mixed
  precision), for every parameter (full) or for the adapters only (LoRA/QLoRA);
- ZeRO-3: model states partitioned over all ranks, with optimizer and parameter offload to
  CPU or NVMe, by DeepSpeed's own model-states formula (`estimate_zero3_model_states_mem_
  needs`, reproduced exactly), plus CPU RAM per node;
- activations for the sequence length and micro-batch, with or without gradient
  checkpointing, and the logits (large for big vocabularies);
- DPO: chosen and rejected go through the model together (twice the tokens); the reference
  is an adapter copy (LoRA/QLoRA) or precomputed log-probabilities (full), so it adds
  almost nothing;
- the runtime itself (CUDA context, or the Python process with torch on a CPU);
- the evaluation after training, which holds the models as the workers did (a full model's
  base and tuned copies spread over a node's GPUs), answers with a KV cache and scores the
  answers over the whole vocabulary (`evaluation_bytes`).
A job fits when both training and its evaluation fit; when it misses, the advice is the
nearest settings of the same method, then the fewest GPUs, that fit.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ftservice.config import DeepSpeedSpec, ModelSpec
from ftservice.data.formats import response_text
from ftservice.data.loaders import DataError, load_rows
from ftservice.errors import FtserviceError
from ftservice.models import ModelError, resolve_model, train_dtype
from ftservice.storage import StorageError

GiB = 2**30
HEADROOM = 0.95  # allocator fragmentation: plan to use at most 95% of a device
CUDA_CONTEXT = int(0.75 * GiB)  # CUDA context, cuBLAS workspaces and kernels
# The worker process on a CPU before any weights: Python, torch, transformers, TRL, Ray
# worker, and the data. Measured here: a training worker with a 2-layer model peaks at it.
CPU_RUNTIME = int(1.0 * GiB)
ZERO3_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
# evaluate.py's batches: greedy answers for 16 prompts at a time, answers scored 8 at a time
EVAL_GENERATE_BATCH = 16
EVAL_SCORE_BATCH = 8
# chat-template tokens around a prompt with the template's default system prompt (measured:
# SmolLM2's 30, Llama 3's 26), and around a system prompt the spec gives
EVAL_TEMPLATE_TOKENS = 32
EVAL_SYSTEM_TEMPLATE_TOKENS = 16
CHARS_PER_TOKEN = 4  # English text under the BPE vocabularies of these families
# The evaluation task's process before any weights: Python, torch, transformers, PEFT and the
# Ray worker (measured here: 0.5 GiB with those imported, and the task's own share)
EVAL_CPU_RUNTIME = int(0.6 * GiB)


class PlanError(FtserviceError):
    """A planner input that cannot be used."""


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape: enough to count parameters and activations."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.kv_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each matmul weight in one layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip

    @property
    def layer_linear_params(self) -> int:
        bias = (self.hidden + 2 * self.kv_dim) if self.qkv_bias else 0
        return sum(a * b for a, b in self.linears().values()) + bias

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return self.layers * 2 * self.hidden + self.hidden

    @property
    def quantizable_params(self) -> int:
        """The layers' linear weights: what 4-bit quantisation packs."""
        return self.layers * self.layer_linear_params

    @property
    def total_params(self) -> int:
        return (
            self.quantizable_params + self.embedding_params + self.lm_head_params
            + self.norm_params
        )  # fmt: skip

    @property
    def largest_layer_params(self) -> int:
        """The largest single module's parameters (DeepSpeed's largest_layer_params)."""
        biggest_linear = max(a * b for a, b in self.linears().values())
        return max(self.embedding_params, self.lm_head_params, biggest_linear)

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        names = list(self.linears()) if targets == "all-linear" else list(targets)
        unknown = [n for n in names if n not in self.linears()]
        if unknown:
            raise PlanError(
                f"lora.target_modules {unknown} are not linear layers of {self.name} "
                f"(it has {', '.join(self.linears())})"
            )
        return self.layers * sum(r * (a + b) for n, (a, b) in self.linears().items() if n in names)


# Published configs (config.json on the Hugging Face hub) of common open families.
FAMILIES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
        Shape("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
        Shape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
        Shape("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
        Shape("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
        Shape("llama-30b", 6656, 17920, 60, 52, 52, 32000),
        Shape("llama-65b", 8192, 22016, 80, 64, 64, 32000),
        Shape("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
        Shape("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
        Shape("qwen2.5-14b", 5120, 13824, 48, 40, 8, 152064, qkv_bias=True),
        Shape("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, qkv_bias=True),
    ]
}


def family_key(name: str) -> str:
    """A hub id or name reduced to the table's key: meta-llama/Meta-Llama-3.1-8B-Instruct ->
    llama-3-8b (fine-tunes and point releases share their family's shape)."""
    key = name.lower().rsplit("/", 1)[-1].removeprefix("meta-")
    key = re.sub(r"-(instruct|chat|hf|base|v0\.\d)$", "", key)
    key = re.sub(r"-(instruct|chat|hf|base|v0\.\d)$", "", key)
    return re.sub(r"^llama-3\.\d", "llama-3", key)


def shape_from_config(config: dict, name: str) -> Shape:
    try:
        return Shape(
            name=name,
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", False))
            or config.get("model_type") == "qwen2",
        )
    except KeyError as e:
        raise PlanError(
            f"{name}: config.json has no {e.args[0]}; the planner knows decoder-only "
            "transformers (Llama, Mistral, Qwen2 and alike)"
        ) from None


def resolve_shape(name: str) -> Shape:
    """A family from the table, a folder or config.json path, or a model the spec names."""
    key = family_key(name)
    if key in FAMILIES:
        return FAMILIES[key]
    path = Path(name)
    if path.is_file() and path.name.endswith(".json"):
        return shape_from_config(json.loads(path.read_text()), name)
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), name)

    try:
        resolved = resolve_model(ModelSpec(name=name))
    except ModelError:
        raise PlanError(
            f"unknown model '{name}': give a config.json, a model folder, the built-in "
            f"model, or one of {', '.join(FAMILIES)}"
        ) from None
    return shape_from_config(json.loads((resolved.path / "config.json").read_text()), name)


@dataclass(frozen=True)
class PlanInput:
    shape: Shape
    method: str = "lora"  # full | lora | qlora
    stage: str = "sft"  # sft | dpo
    gpus: int = 1  # devices per node: GPUs, or worker processes when on_cpu
    nodes: int = 1
    on_cpu: bool = False  # CPU workers: the "device" is a worker's share of the node's RAM
    device_mem_gb: float | None = None  # per GPU (or per CPU worker)
    cpu_mem_gb: float | None = None  # per node, for offload
    offload: str = "none"  # none | cpu | nvme: ZeRO-3 optimizer offload
    offload_params: str = "none"
    seq_len: int = 2048
    micro_batch: int = 1
    packing: bool = False  # TRL's padding-free packing: a micro-batch is one long row
    gradient_checkpointing: bool = True
    lora_r: int = 16
    lora_targets: list[str] | str = "all-linear"
    precision: str = "bf16"  # bf16 | fp32 (CPU runs in fp32 or bf16 autocast)
    zero3: bool | None = None  # full: ZeRO-3 (default on)
    unquantized_dtype: str = "float32"  # qlora: embeddings, norms, LM head (PEFT casts: fp32)
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes, GPUs)
    evaluate: bool = True  # the evaluation after training (domain score and forgetting)
    eval_tokens: int = 256  # its longest row: prompt and answer (or max_new_tokens)

    @property
    def ranks(self) -> int:
        return self.gpus * self.nodes


@dataclass
class Plan:
    input: dict
    per_device: dict[str, int]
    total_bytes: int
    cpu_per_node_bytes: int
    device_bytes: int | None
    fits: bool | None
    notes: list[str] = field(default_factory=list)
    cheapest: dict | None = None
    advice: list[dict] = field(default_factory=list)
    # the evaluation after training, per device; `fits` needs both it and training to fit
    evaluation: dict[str, int] = field(default_factory=dict)
    evaluation_bytes: int = 0
    training_fits: bool | None = None
    evaluation_fits: bool | None = None

    @property
    def peak_bytes(self) -> int:
        """Per device, the larger of training and the evaluation after it."""
        return max(self.total_bytes, self.evaluation_bytes)

    def to_json(self) -> dict:
        return asdict(self) | {"peak_bytes": self.peak_bytes}


def _activation_bytes(p: PlanInput, tokens: int, elem: int) -> dict[str, int]:
    s = p.shape
    # saved for backward per token per layer (elements): norms' inputs and outputs, q, k, v,
    # rotated q and k, attention output, MLP gate, up, their activation and product
    per_layer_full = 9 * s.hidden + 4 * s.kv_dim + 4 * s.intermediate
    if p.gradient_checkpointing:
        # each layer keeps its input; one layer at a time is recomputed in full
        layers = tokens * elem * (s.layers * s.hidden + per_layer_full)
    else:
        layers = tokens * elem * s.layers * per_layer_full
    out = {"activations": int(layers)}
    # the LM head's output in the compute dtype and its fp32 log-softmax (TRL's fused head
    # chunks this on GPUs; measured here on CPUs it is about one such pair)
    out["logits"] = int(tokens * s.vocab * (elem + 4))
    if p.on_cpu:
        # No flash kernel on a CPU: SDPA with a mask materialises the attention scores, kept
        # for backward as the fp32 softmax and compute-dtype scores and probabilities. A
        # packed micro-batch is one row of micro_batch × seq_len tokens (block-diagonal mask).
        per_seq = 2 if p.stage == "dpo" else 1
        rows, row_len = (1, tokens) if p.packing else (p.micro_batch * per_seq, p.seq_len)
        kept = 1 if p.gradient_checkpointing else s.layers
        out["attention_scores"] = kept * s.heads * rows * row_len**2 * (4 + 2 * elem)
    return out


def zero3_model_states(p: PlanInput) -> tuple[int, int, int]:
    """DeepSpeed's estimate_zero3_model_states_mem_needs (cpu, gpu, largest layer), with
    zero_init and its buffer factor, for this plan's offload settings."""
    total, largest = p.shape.total_params, p.shape.largest_layer_params
    gpus_factor = 1 / p.nodes
    largest_mem = 4 * largest
    offload_opt = p.offload != "none"
    offload_params = p.offload_params != "none"
    if offload_opt and offload_params:
        gpu = largest_mem
        cpu = total * 18 * gpus_factor * ZERO3_BUFFER_FACTOR
    elif offload_opt:
        gpu = largest_mem + int(2 * total / p.ranks)
        cpu = total * 16 * gpus_factor * ZERO3_BUFFER_FACTOR
    else:
        gpu = largest_mem + int(18 * total / p.ranks)
        cpu = largest * 4 * p.gpus * ZERO3_BUFFER_FACTOR
    return int(cpu), int(gpu), largest_mem


def _qlora_weights(s: Shape, unquantized_elem: int, on_cpu: bool) -> dict[str, int]:
    q = s.quantizable_params
    # NF4: 4 bits/weight; double quantisation: 8-bit absmax per 64 weights and an fp32
    # constant per 256 of those blocks (+ the 16-entry code books)
    out = {"weights_4bit": q // 2 + q // 64 + 4 * math.ceil(q / (64 * 256))}
    kind = "bf16" if unquantized_elem == 2 else "fp32"
    out[f"weights_unquantized_{kind}"] = unquantized_elem * (
        s.embedding_params + s.lm_head_params + s.norm_params
    )
    if on_cpu:
        # measured: on a CPU the fp32 weights quantised at load stay in the process heap
        # (freed, not returned to the OS); a GPU quantises as it loads
        out["cpu_load_residue"] = 4 * q
    return out


def evaluation_bytes(p: PlanInput) -> dict[str, int]:
    """Per device, the evaluation after training (`evaluate.py`, `eval_placement`): the
    models as training held them (CPUs: fp32; adapters: one GPU, the base once; full: base
    and tuned spread over a node's GPUs), greedy answers with their KV cache, and the answers
    scored with both models' log-probabilities over the vocabulary."""
    s, tokens = p.shape, p.eval_tokens
    elem = 4 if p.on_cpu or p.precision != "bf16" else 2
    spread = 1 if p.on_cpu or p.method != "full" else p.gpus
    parts: dict[str, int] = {}
    if p.method == "full":
        # accelerate's device map: even layers, up to one module of imbalance
        parts["base_and_tuned"] = 2 * s.total_params * elem // spread
        if spread > 1:
            parts["uneven_split"] = s.largest_layer_params * elem
    elif p.method == "lora":
        parts["weights"] = s.total_params * elem
    else:  # loaded in the compute dtype: no k-bit preparation casts the rest to fp32
        parts |= _qlora_weights(s, elem, p.on_cpu)
    if p.method != "full":
        parts["adapter_fp32"] = s.lora_params(p.lora_r, p.lora_targets) * 4  # PEFT upcasts
    parts["kv_cache"] = EVAL_GENERATE_BATCH * tokens * s.layers * 2 * s.kv_dim * elem // spread
    rows = EVAL_SCORE_BATCH * tokens * s.vocab
    # the logits, their fp32 copy and log-softmax on the device (GPUs: moved to the host
    # after); on a CPU both models' log-probabilities and the KL terms stay in the process
    parts["scoring_logits"] = rows * (20 if p.on_cpu else elem + 8)
    # no gradients: one layer's activations at a time
    parts["activations"] = EVAL_SCORE_BATCH * tokens * (4 * s.hidden + 3 * s.intermediate) * elem
    if p.on_cpu:  # SDPA with a mask materialises one layer's scores and probabilities
        parts["attention_scores"] = 2 * s.heads * EVAL_SCORE_BATCH * tokens**2 * 4
    parts["runtime"] = EVAL_CPU_RUNTIME if p.on_cpu else CUDA_CONTEXT
    return parts


def plan(p: PlanInput) -> Plan:
    s = p.shape
    if p.gpus < 1 or p.nodes < 1:
        raise PlanError("--gpus and --nodes must be at least 1")
    on_cpu = p.on_cpu
    elem = 2 if p.precision == "bf16" else 4
    notes: list[str] = []
    parts: dict[str, int] = {}
    cpu_per_node = 0
    tokens = p.micro_batch * p.seq_len * (2 if p.stage == "dpo" else 1)
    if p.method == "full":
        zero3 = p.zero3 if p.zero3 is not None else True
        if zero3:
            cpu_per_node, gpu_states, largest_mem = zero3_model_states(p)
            parts["model_states_zero3"] = gpu_states
            notes.append(
                f"ZeRO-3 over {p.ranks} rank(s): 18 bytes/parameter partitioned "
                f"(offload: optimizer {p.offload}, parameters {p.offload_params}), plus the "
                f"largest layer gathered ({largest_mem / GiB:.2f} GiB)"
            )
        else:
            # weights and gradients in the compute dtype; AdamW's two fp32 moments, and fp32
            # master weights in mixed precision: 16 bytes a parameter either way
            parts["weights"] = s.total_params * elem
            parts["gradients"] = s.total_params * elem
            # fp32 master weights in mixed precision, and AdamW's two moments (fp32: 8 bytes;
            # bitsandbytes' 8-bit: 2 bytes)
            master = 4 if elem == 2 else 0
            parts["optimizer"] = s.total_params * (master + _moment_bytes(p))
        if p.stage == "dpo":
            notes.append("DPO reference: log-probabilities precomputed before training (no copy)")
    elif p.method in ("lora", "qlora"):
        lora = s.lora_params(p.lora_r, p.lora_targets)
        if p.method == "lora":
            parts["weights"] = s.total_params * elem
            lora_bytes_per = 4 + 4 + _moment_bytes(p)  # fp32 adapter and gradient, AdamW
        else:
            kept = 2 if p.unquantized_dtype == "bfloat16" else 4
            parts |= _qlora_weights(s, kept, on_cpu)
            lora_bytes_per = 2 + 2 + _moment_bytes(p)  # bf16 adapter, gradient (TRL casts)
        parts["adapters_and_optimizer"] = lora * lora_bytes_per
        if p.stage == "dpo":
            parts["dpo_reference_adapter"] = lora * 4  # TRL's "ref" copy of the adapter
            notes.append("DPO reference: a copy of the adapter on the same base (no model copy)")
    else:
        raise PlanError(f"method '{p.method}' is not one of full, lora, qlora")
    parts |= _activation_bytes(p, tokens, elem)
    parts["runtime"] = CPU_RUNTIME if on_cpu else CUDA_CONTEXT
    total = sum(parts.values())
    evaluation = evaluation_bytes(p) if p.evaluate else {}
    eval_total = sum(evaluation.values())
    device = int(p.device_mem_gb * GiB) if p.device_mem_gb else None
    training_fits = evaluation_fits = None
    if device is not None:
        training_fits = total <= device * HEADROOM
        if cpu_per_node and p.cpu_mem_gb:
            training_fits = training_fits and cpu_per_node <= p.cpu_mem_gb * GiB * HEADROOM
        evaluation_fits = eval_total <= device * HEADROOM
    fits = None if device is None else bool(training_fits and evaluation_fits)
    return Plan(
        asdict(p) | {"shape": asdict(s)}, parts, total, cpu_per_node, device, fits, notes,
        evaluation=evaluation, evaluation_bytes=eval_total, training_fits=training_fits,
        evaluation_fits=evaluation_fits,
    )  # fmt: skip


def _moment_bytes(p: PlanInput) -> int:
    return 2 if p.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8


# Settings of the same method a plan that misses can change, nearest first: (the job spec's
# fields and values, what they change in the plan). Each field is one training honours.
def _knobs(p: PlanInput) -> list[tuple[dict, dict]]:
    out: list[tuple[dict, dict]] = []
    if not p.gradient_checkpointing:
        out.append(({"train.gradient_checkpointing": True}, {"gradient_checkpointing": True}))
    if p.method == "qlora" and p.unquantized_dtype != "bfloat16":
        out.append(({"quantization.unquantized_dtype": "bfloat16"},
                    {"unquantized_dtype": "bfloat16"}))  # fmt: skip
    if not p.on_cpu and p.optimizer == "adamw":
        out.append(({"train.optimizer": "paged_adamw_8bit"}, {"optimizer": "paged_adamw_8bit"}))
    if p.micro_batch > 1:
        out.append(({"train.micro_batch_size": 1}, {"micro_batch": 1}))
    if p.method in ("lora", "qlora") and p.lora_targets == "all-linear":
        attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
        out.append(({"lora.target_modules": attention}, {"lora_targets": attention}))
    for seq in (p.seq_len // 2, p.seq_len // 4):
        if seq >= 256:
            out.append(({"data.max_seq_length": seq}, {"seq_len": seq}))
    if p.evaluate:  # last: it gives up the evaluation (run `ftservice eval` where it fits)
        out.append(({"eval.domain": None, "eval.general": None}, {"evaluate": False}))
    return out


def _entry(p: PlanInput, result: Plan, changes: dict) -> dict:
    return {
        "changes": changes,
        "method": p.method,
        "gpus_per_node": p.gpus,
        "nodes": p.nodes,
        "offload": p.offload,
        "per_device_gib": round(result.peak_bytes / GiB, 2),
        "fits": bool(result.fits),
    }


def advise(p: PlanInput, limit: int = 6) -> list[dict]:
    """What fits, best first: the fewest GPUs; at equal GPUs, the same method with the fewest
    and nearest changes of its settings (gradient checkpointing, bf16 unquantized weights,
    a paged 8-bit optimizer, micro-batch 1, attention-only LoRA, shorter sequences, and last
    no evaluation after training), then other methods and more GPUs with the settings as they
    are."""
    if p.device_mem_gb is None:
        return []
    found: list[tuple[tuple, dict]] = []
    knobs = _knobs(p)
    fitting: list[set] = []
    for n in range(len(knobs) + 1):
        for combo in itertools.combinations(range(len(knobs)), n):
            paths = [path for i in combo for path in knobs[i][0]]
            if len(set(paths)) < len(paths):  # two sequence lengths at once
                continue
            if any(f <= set(combo) for f in fitting):  # a smaller change already fits
                continue
            candidate = p
            for i in combo:
                candidate = replace(candidate, **knobs[i][1])
            result = plan(candidate)
            if n and result.fits:
                fitting.append(set(combo))
                changes = {k: v for i in combo for k, v in knobs[i][0].items()}
                found.append(
                    ((p.ranks, 0, sum(1 + i for i in combo)), _entry(candidate, result, changes))
                )
    other = cheapest(p)
    if other is not None:
        candidate = replace(p, method=other["method"], gpus=other["gpus_per_node"],
                            nodes=other["nodes"], offload=other["offload"])  # fmt: skip
        changes = {"method": other["method"]} if other["method"] != p.method else {}
        if (other["gpus_per_node"], other["nodes"]) != (p.gpus, p.nodes):
            changes |= {"scaling.num_workers": other["gpus_per_node"] * other["nodes"]}
        if other["offload"] != "none":
            changes |= {"scaling.deepspeed.offload_optimizer": other["offload"]}
        if changes:
            found.append(((candidate.ranks, 1, 0), _entry(candidate, plan(candidate), changes)))
    found.sort(key=lambda x: x[0])
    return [entry for _, entry in found[:limit]]


def cheapest(p: PlanInput, max_gpus_per_node: int = 8, max_nodes: int = 16) -> dict | None:
    """The fewest GPUs that fit; at equal count full before LoRA before QLoRA (quality), and
    CPU offload (slow) last, only when the nodes' RAM is given."""
    if p.device_mem_gb is None:
        return None
    counts = [(g, 1) for g in (1, 2, 4, 8) if g <= max_gpus_per_node]
    counts += [(max_gpus_per_node, n) for n in range(2, max_nodes + 1)]
    options = [("full", "none"), ("lora", "none"), ("qlora", "none")]
    if p.cpu_mem_gb:  # offload only where the nodes' RAM is known to hold it
        options.append(("full", "cpu"))
    for gpus, nodes in counts:
        for method, offload in options:
            if method != "full" and (gpus, nodes) != (1, 1):
                continue  # adapters: one GPU per worker is the unit; more are data parallel
            candidate = replace(p, method=method, gpus=gpus, nodes=nodes, offload=offload)
            result = plan(candidate)
            if result.fits:
                return {
                    "method": method,
                    "gpus_per_node": gpus,
                    "nodes": nodes,
                    "offload": offload,
                    "per_device_gib": round(result.peak_bytes / GiB, 2),
                }
    return None


def plan_with_verdict(p: PlanInput) -> Plan:
    result = plan(p)
    result.cheapest = cheapest(p)
    if result.fits is False:
        result.advice = advise(p)
    return result


def format_plan(result: Plan) -> str:
    i = result.input
    unit = "CPU worker(s)" if i["on_cpu"] else "GPU(s)"
    where = f"{i['gpus']} {unit} × {i['nodes']} node(s)"
    billions = Shape(**i["shape"]).total_params / 1e9
    lines = [
        f"plan: {i['method']} {i['stage']} of {i['shape']['name']} ({billions:.2f}B "
        f"parameters) on {where}, seq {i['seq_len']} × micro-batch {i['micro_batch']}"
        + (", gradient checkpointing" if i["gradient_checkpointing"] else "")
    ]
    for k, v in result.per_device.items():
        lines.append(f"  {k:<28} {v / GiB:8.2f} GiB")
    lines.append(f"  {'total per device':<28} {result.total_bytes / GiB:8.2f} GiB")
    if result.cpu_per_node_bytes:
        lines.append(f"  {'CPU RAM per node':<28} {result.cpu_per_node_bytes / GiB:8.2f} GiB")
    lines += [f"  note: {n}" for n in result.notes]
    if result.evaluation:
        lines.append(
            f"evaluation after training ({i['eval_tokens']} tokens a row at most), per device:"
        )
        for k, v in result.evaluation.items():
            lines.append(f"  {k:<28} {v / GiB:8.2f} GiB")
        lines.append(f"  {'total per device':<28} {result.evaluation_bytes / GiB:8.2f} GiB")
    if result.fits is not None:
        have = result.device_bytes / GiB
        lines.append(
            f"verdict: {'fits' if result.fits else 'does NOT fit'} in {have:.3g} GiB per device"
            f" (planning to {HEADROOM:.0%} of it)"
        )
        if result.training_fits and not result.evaluation_fits:
            lines.append(
                f"  training fits; the evaluation after it needs "
                f"{result.evaluation_bytes / GiB:.2f} GiB"
            )
    if result.advice:
        lines.append("advice, best first (what fits):")
        for a in result.advice[:3]:
            what = ", ".join(f"{k}={json.dumps(v)}" for k, v in a["changes"].items())
            lines.append(
                f"  {what}: {a['method']} on {a['gpus_per_node']} GPU(s) × {a['nodes']} "
                f"node(s), {a['per_device_gib']} GiB per device"
            )
    if result.cheapest:
        c = result.cheapest
        lines.append(
            f"fewest GPUs with these settings: {c['method']} on {c['gpus_per_node']} GPU(s) × "
            f"{c['nodes']} node(s), offload {c['offload']} ({c['per_device_gib']} GiB per GPU)"
        )
    elif result.fits is not None:
        lines.append(
            "fewest GPUs with these settings: nothing up to 16 nodes of 8 GPUs of this size"
        )
    return "\n".join(lines)


def eval_row_tokens(spec) -> int:
    """The longest row the evaluation after training will score: the longest prompt of its
    domain and general sets (read by our loaders, with the system prompt) and the chat
    template, and the longer of its reference answer and max_new_tokens (tokens counted as
    4 characters each). Sets this machine cannot read count as a prompt of 256 tokens."""
    longest = 0
    for path in (spec.eval.domain, spec.eval.general):
        if path is None:
            continue
        try:
            rows = load_rows([path], system_prompt=spec.data.system_prompt, split="eval")
        except (DataError, StorageError):  # `train` names what is wrong with the set itself
            rows = [None]
        for row in rows:
            if row is None:
                prompt, answer = 256 * CHARS_PER_TOKEN, 0
            else:
                turns = [m for m in row["messages"] if m["role"] != "assistant"]
                prompt = sum(len(m["content"] or "") for m in turns)
                answer = len(response_text(row))
            tokens = math.ceil(prompt / CHARS_PER_TOKEN)
            tokens += max(math.ceil(answer / CHARS_PER_TOKEN), spec.eval.max_new_tokens)
            longest = max(longest, tokens)
    template = EVAL_SYSTEM_TEMPLATE_TOKENS if spec.data.system_prompt else EVAL_TEMPLATE_TOKENS
    return longest + template


def plan_for_spec(spec, evaluate: bool = True) -> Plan:
    """The plan of a job spec on the devices it asks for (a GPU's memory from
    `cluster.gpu_memory_gb`; CPU workers share this node's RAM, or `cluster.memory_gb`),
    with the evaluation after training unless `evaluate` is off or the spec has no
    evaluation sets."""

    sc, cl = spec.scaling, spec.cluster
    ds = sc.deepspeed or DeepSpeedSpec() if spec.method == "full" else None
    workers = max(sc.num_workers, 1)
    if sc.use_gpu:
        per_node = min(workers, cl.gpus_per_node or workers)
        nodes = math.ceil(workers / per_node)
        device_gb = cl.gpu_memory_gb
    else:
        import psutil

        per_node, nodes = workers, 1
        ram_gb = cl.memory_gb or psutil.virtual_memory().total / GiB
        device_gb = ram_gb / workers
    lora = spec.lora
    precision = "bf16" if str(train_dtype(spec.train.precision)) == "torch.bfloat16" else "fp32"
    p = PlanInput(
        shape=resolve_shape(spec.model.name),
        method=spec.method,
        stage=spec.stage,
        gpus=per_node,
        nodes=nodes,
        on_cpu=not sc.use_gpu,
        device_mem_gb=device_gb,
        cpu_mem_gb=cl.memory_gb,
        offload=ds.offload_optimizer if ds else "none",
        offload_params=ds.offload_params if ds else "none",
        seq_len=spec.data.max_seq_length,
        micro_batch=spec.train.micro_batch_size,
        packing=spec.data.packing and spec.stage == "sft",
        gradient_checkpointing=spec.train.gradient_checkpointing,
        lora_r=lora.r,
        lora_targets=lora.target_modules,
        precision=precision,
        zero3=ds.stage == 3 if ds else None,
        unquantized_dtype=spec.quantization.unquantized_dtype,
        optimizer=spec.train.optimizer,
        evaluate=evaluate and bool(spec.eval.domain or spec.eval.general),
        eval_tokens=eval_row_tokens(spec),
    )
    return plan_with_verdict(p)
