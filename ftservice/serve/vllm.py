"""`backend: vllm`: the model deployment on Ray Serve LLM, in the vLLM environment.

The deployment class is defined here, in the training environment, and pickled by value;
its replicas run the vLLM environment's interpreter (Ray's `py_executable`) and import
`ftservice.serve.vllm_backend` there. It answers the ingress as the transformers replica
does (`generate`, `generate_stream`, `stats`, `check_health`, adapters multiplexed by
name), so keys, limits, the gate, the page, the loop and the jobs API are the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ray import serve

from ftservice.models import resolve_model
from ftservice.serve.spec import ServeSpec


def vllm_python(spec: ServeSpec) -> str:
    """The vLLM environment's interpreter as an absolute path (Ray starts it elsewhere)."""
    path = Path(spec.vllm.python).expanduser()
    return str(path if path.is_absolute() else Path.cwd() / path)


def vllm_settings(spec: ServeSpec) -> dict:
    """What a vLLM replica needs, as plain data (it has no ftservice spec classes)."""
    base = resolve_model(spec.model)
    config = json.loads((base.path / "config.json").read_text())
    replicas = spec.replicas
    zero = spec.vllm.zero_base == "on" or (spec.vllm.zero_base == "auto" and not replicas.gpus)
    return {
        "base_path": str(base.path),
        "base_name": spec.base_name or spec.model.name,
        "max_adapters": replicas.max_adapters,
        "max_lora_rank": spec.gate.max_lora_rank,
        "max_model_len": config.get("max_position_embeddings") or 2048,
        "dtype": "bfloat16" if replicas.gpus else "float32",
        "cpus": replicas.cpus,
        "gpus": replicas.gpus,
        "zero_base": zero,
        "engine_kwargs": dict(spec.vllm.engine_kwargs),
    }


def vllm_env(spec: ServeSpec) -> dict:
    """The replica's environment variables: vLLM's CPU settings, the app's S3 endpoint."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(spec.vllm.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(spec.replicas.torch_threads),
        "RAY_SERVE_LLM_ENABLE_USAGE_TELEMETRY": "0",
        "VLLM_NO_USAGE_STATS": "1",
    }
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "FTSERVICE_CACHE"):  # fmt: skip
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def vllm_deployment(spec: ServeSpec):
    """The vLLM model deployment class, with the spec's replicas and multiplexing."""
    replicas = spec.replicas
    bundle = {"CPU": replicas.cpus} | ({"GPU": replicas.gpus} if replicas.gpus else {})
    options = spec.model_options()
    options["ray_actor_options"]["runtime_env"] = {
        "py_executable": vllm_python(spec),
        "env_vars": vllm_env(spec),
    }
    options["placement_group_bundles"] = [bundle]
    options["placement_group_strategy"] = "STRICT_PACK"
    max_adapters = replicas.max_adapters

    @serve.deployment(name="model", **options)
    class VLLMModelServer:
        # This body runs in the vLLM environment: it names only Ray and its own imports.
        async def __init__(self, settings: dict):
            from ftservice.serve.vllm_backend import VLLMBackend

            self.backend = await VLLMBackend.create(settings)
            self.locations: dict[str, str] = {}
            self.in_flight = 0

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str):
            from ftservice.serve.protocol import ApiError
            from ftservice.serve.vllm_backend import AdapterHold

            location = self.locations.get(name)
            if location is None:
                raise ApiError(400, f"adapter '{name}' came without its location",
                               param="model")  # fmt: skip
            try:
                request = await self.backend.load_adapter(name, location)
            except Exception as e:
                raise ApiError(400, f"vLLM cannot load the adapter '{name}': {e}",
                               code="adapter_not_servable", param="model") from None  # fmt: skip
            return AdapterHold(self.backend, name, request)

        async def _lora(self, payload: dict):
            name = serve.get_multiplexed_model_id() or None
            if not name:
                return None
            if payload.get("adapter_location"):
                self.locations[name] = payload["adapter_location"]
            return (await self.adapter(name)).request

        async def generate(self, payload: dict) -> dict:
            self.in_flight += 1
            try:
                return await self.backend.generate(payload, await self._lora(payload))
            finally:
                self.in_flight -= 1

        async def generate_stream(self, payload: dict):
            lora = await self._lora(payload)
            async for item in self.backend.generate_stream(payload, lora):
                yield item

        def stats(self) -> dict:
            return {
                "backend": "vllm",
                "adapters": sorted(self.backend.loaded),
                "in_flight": self.in_flight,
                "zero_base": self.backend.zero is not None,
                "replica": serve.get_replica_context().replica_id.unique_id,
            }

        async def check_health(self) -> None:
            await self.backend.check_health()

    return VLLMModelServer
