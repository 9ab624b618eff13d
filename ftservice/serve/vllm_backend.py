"""The model replica of `backend: vllm`: Ray Serve LLM's `LLMServer` (vLLM's engine, built
from an `LLMConfig`) behind the same replica interface as the transformers backend.

This module runs in the vLLM environment (`.venv-vllm`, `make vllm-env`), whose
transformers and FastAPI the training stack is past, so it imports nothing of ftservice
beyond itself: the ingress (keys, limits, the gate, chat templates, tokenisation) stays in the
training environment and sends prompt token ids, as it does to the transformers replica.

Adapters are loaded by the location the ingress's gate approved (a registry folder, local
or in a bucket), not by Ray Serve LLM's `dynamic_lora_loading_path`, which takes only
bucket URIs: a local registry then serves, and an adapter published while serving is
servable at once. The base is served as a zero adapter (B = 0) where `zero_base` is set:
vLLM 0.32's CPU LoRA kernels give rows without an adapter the last slot's adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

ZERO_ADAPTER = "ftservice-zero-base"
# vLLM accepts only these LoRA ranks as the engine's cap; the gate enforces the spec's own
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_rank(max_lora_rank: int) -> int:
    """The smallest rank vLLM accepts as its cap that holds the gate's cap."""
    for rank in VLLM_RANKS:
        if rank >= max_lora_rank:
            return rank
    raise ValueError(f"gate.max_lora_rank {max_lora_rank} is over vLLM's largest, 512")


def llm_config(settings: dict):
    """Ray Serve LLM's LLMConfig for the serve spec's settings (see `vllm.vllm_settings`)."""
    from ray.serve.llm import LLMConfig

    engine = {
        "enable_lora": True,
        # the zero adapter that carries the base's rows holds a slot of its own
        "max_loras": settings["max_adapters"] + (1 if settings["zero_base"] else 0),
        "max_cpu_loras": settings["max_adapters"] + (1 if settings["zero_base"] else 0),
        "max_lora_rank": engine_rank(settings["max_lora_rank"]),
        "max_model_len": settings["max_model_len"],
        "dtype": settings["dtype"],
        "seed": 0,
        **settings["engine_kwargs"],
    }
    bundle = {"CPU": settings["cpus"]} | ({"GPU": settings["gpus"]} if settings["gpus"] else {})
    return LLMConfig(
        model_loading_config={
            "model_id": settings["base_name"],
            "model_source": settings["base_path"],
        },
        engine_kwargs=engine,
        lora_config={"max_num_adapters_per_replica": settings["max_adapters"]},
        placement_group_config={"bundles": [bundle], "strategy": "STRICT_PACK"},
        log_engine_metrics=False,
    )


def write_zero_adapter(base_path: str, folder: Path) -> Path:
    """A rank-1 LoRA on the first layer's q_proj with B = 0: the base's output, on a slot."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(base_path) / "config.json").read_text())
    hidden = cfg["hidden_size"]
    q_out = cfg["num_attention_heads"] * (
        cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    )
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(1, hidden),
         f"{prefix}.lora_B.weight": torch.zeros(q_out, 1)},
        str(folder / "adapter_model.safetensors"),
    )  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"],
        "bias": "none", "base_model_name_or_path": base_path, "task_type": "CAUSAL_LM",
    }))  # fmt: skip
    return folder


def local_copy(location: str) -> str:
    """A local folder for an adapter location: itself when local, else a copy of the
    bucket's folder (made once per version of its weights)."""
    if "://" not in location:
        return location
    if location.startswith("file://"):
        return location[len("file://") :]
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(location)
    info = fs.get_file_info(f"{path}/adapter_model.safetensors")
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: no adapter_model.safetensors there")
    key = hashlib.sha256(f"{location}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "ftservice-vllm-adapters" / key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            pafs.copy_files(f"{path}/{name}", str(tmp / name), source_filesystem=fs)
        os.replace(tmp, target)
    return str(target)


class AdapterHold:
    """What Serve's multiplexer holds per adapter; evicting it removes the adapter from the
    engine (Serve awaits an async `__del__`)."""

    def __init__(self, backend: VLLMBackend, name: str, request):
        self.backend, self.name, self.request = backend, name, request

    async def __del__(self):
        await self.backend.unload_adapter(self.name, self.request)


class VLLMBackend:
    """One replica's vLLM engine: generation from prompt token ids, per-request adapters."""

    def __init__(self, settings: dict, server):
        self.settings, self.server = settings, server
        self.client = server.engine._engine_client  # vLLM's AsyncLLM
        self.next_id = 1
        self.zero = None
        self.loaded: dict[str, object] = {}  # adapter name -> its LoRARequest
        # vLLM 0.32 computes a batch's prompt logprobs through the LoRA logits processor
        # with the batch's sampling indices, which fails (and kills the engine) once two
        # rows are in the batch; a request that wants them (echo) runs alone
        self.turns = asyncio.Condition()
        self.running = 0
        self.alone = False
        self.waiting_alone = 0

    @classmethod
    async def create(cls, settings: dict) -> VLLMBackend:
        from ray.serve.llm import LLMServer

        server = LLMServer.sync_init(llm_config(settings))
        await server.start()
        backend = cls(settings, server)
        if settings["zero_base"]:
            folder = Path(tempfile.mkdtemp(prefix="ftservice-zero-"))
            backend.zero = backend.lora(
                ZERO_ADAPTER, str(write_zero_adapter(settings["base_path"], folder))
            )
        return backend

    def lora(self, name: str, path: str):
        from vllm.lora.request import LoRARequest

        request = LoRARequest(lora_name=name, lora_int_id=self.next_id, lora_path=path)
        self.next_id += 1  # a reload (a republished adapter) gets a new id: vLLM reads it again
        return request

    async def load_adapter(self, name: str, location: str):
        """The adapter's LoRARequest; vLLM reads its weights when a batch first needs it,
        so it is added to the engine here to fail at load (not mid-batch) on bad weights."""
        path = await asyncio.to_thread(local_copy, location)
        request = self.lora(name, path)
        await self.client.add_lora(request)
        self.loaded[name] = request
        return request

    async def unload_adapter(self, name: str, request) -> None:
        if self.loaded.get(name) is request:
            del self.loaded[name]
        await self.client.remove_lora(request.lora_int_id)

    def sampling(self, payload: dict):
        from vllm import SamplingParams

        logprobs = payload.get("logprobs")
        return SamplingParams(
            max_tokens=payload["max_new_tokens"],
            temperature=payload["temperature"],
            top_p=payload["top_p"],
            seed=payload.get("seed"),
            stop=payload.get("stop") or None,
            logprobs=logprobs if logprobs is not None else None,
            prompt_logprobs=0 if payload.get("echo") else None,
        )

    async def take_turn(self, alone: bool) -> None:
        """Wait until this request may enter the engine: one that must run alone waits
        for the engine to empty, and holds back requests that come after it."""
        async with self.turns:
            self.waiting_alone += alone
            try:
                await self.turns.wait_for(
                    lambda: (
                        not self.alone and (self.running == 0 if alone else self.waiting_alone == 0)
                    )
                )
            finally:
                self.waiting_alone -= alone
            self.running += 1
            self.alone = alone

    async def end_turn(self, alone: bool) -> None:
        async with self.turns:
            self.running -= 1
            if alone:
                self.alone = False
            self.turns.notify_all()

    async def outputs(self, payload: dict, lora):
        """vLLM's cumulative outputs for one request."""
        from vllm.inputs import TokensPrompt

        request_id = f"ftservice-{time.time_ns()}-{id(payload)}"
        prompt = TokensPrompt(prompt_token_ids=list(payload["prompt_ids"]))
        lora = lora if lora is not None else self.zero
        alone = bool(payload.get("echo"))
        await self.take_turn(alone)
        try:
            async for out in self.client.generate(
                prompt, self.sampling(payload), request_id, lora_request=lora
            ):
                yield out
        finally:
            await self.end_turn(alone)

    def generation(self, payload: dict, out) -> dict:
        """vLLM's final output as the replica interface's generation."""
        done = out.outputs[0]
        token_ids = list(done.token_ids)
        token_logprobs = top_logprobs = prompt_logprobs = None
        if payload.get("logprobs") is not None and done.logprobs is not None:
            token_logprobs = [
                step[t].logprob for step, t in zip(done.logprobs, token_ids, strict=True)
            ]
            top_logprobs = [
                {int(t): lp.logprob for t, lp in step.items() if lp.rank is not None
                 and lp.rank <= max(payload["logprobs"], 1)}
                for step in done.logprobs
            ]  # fmt: skip
        if payload.get("echo") and out.prompt_logprobs is not None:
            steps = zip(out.prompt_logprobs, payload["prompt_ids"], strict=True)
            prompt_logprobs = [None if step is None else step[t].logprob for step, t in steps]
        return {
            "text": done.text,
            "token_ids": token_ids,
            "finish_reason": "length" if done.finish_reason == "length" else "stop",
            "prompt_tokens": len(payload["prompt_ids"]),
            "completion_tokens": len(token_ids),
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "prompt_logprobs": prompt_logprobs,
        }

    async def generate(self, payload: dict, lora) -> dict:
        final = None
        async for out in self.outputs(payload, lora):
            final = out
        return self.generation(payload, final)

    async def generate_stream(self, payload: dict, lora):
        """Text pieces as they are generated, then the whole generation."""
        sent, out = 0, None
        async for out in self.outputs(payload, lora):
            text = out.outputs[0].text
            if len(text) > sent:
                yield {"text": text[sent:]}
                sent = len(text)
        yield {"final": self.generation(payload, out)}

    async def check_health(self) -> None:
        await self.client.check_health()
