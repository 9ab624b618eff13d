"""The Ray Serve app: an ingress (FastAPI: keys, limits, the OpenAI-shaped routes) in front of
a model deployment whose replicas each hold ONE base with adapters loaded into it.

Requests name an adapter, the base, or `base:adapter`. The ingress resolves the name, runs the
compatibility gate, applies the artifact's chat template (and its training system prompt),
and sends the prompt tokens to a model replica chosen by Serve's multiplexing (replicas that
hold the adapter first). In the replica, a batcher gathers concurrent requests, for any
adapters, into one engine call: one forward pass serves rows of different adapters (Serve's
own `@serve.batch` splits batches by multiplexed model id: see batcher.py).
"""

import asyncio
import functools
import json
import logging
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import torch
from fastapi import Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics as serve_metrics
from ray.serve.context import _get_serve_request_context
from ray.serve.exceptions import BackPressureError
from sqlalchemy import delete, select
from transformers import AutoTokenizer

from ftservice.config import JobSpec
from ftservice.feedback import rounds
from ftservice.models import resolve_model
from ftservice.serve.api import api
from ftservice.serve.arena import ArenaRoutes
from ftservice.serve.batcher import Batcher
from ftservice.serve.engine import Engine, Generation, GenerationRequest
from ftservice.serve.finetune import FineTuneRoutes, JobRoutes
from ftservice.serve.gate import Gate, candidates, check_name
from ftservice.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    stops,
)
from ftservice.serve.spec import ServeSpec
from ftservice.serve.vllm import vllm_deployment, vllm_settings
from ftservice.storage import localize
from ftservice.store.db import open_store
from ftservice.store.keys import Caller, authenticate, record_usage, take_request
from ftservice.store.models import DisabledAdapter

# Serve writes this logger to each replica's log file (with its request id) and the driver
log = logging.getLogger("ray.serve")
RETRIES = 2  # a non-streaming request whose replica died is sent again this many times
# Serve's default of 5 ongoing requests per replica would make the light async ingress the
# bottleneck (batches never fill) and hide overload from the model deployment's queue cap,
# which is what answers 503 (limits.max_queued_requests)
INGRESS_MAX_ONGOING = 1024
ALIAS_TTL_S = 1.0  # how stale an alias may be (the loop waits this long after a change)
LISTING_TTL_S = 2.0  # how stale the registries' listing may be (a new name is looked up)


def _generation_json(gen: Generation) -> dict:
    return {
        "text": gen.text,
        "token_ids": gen.token_ids,
        "finish_reason": gen.finish_reason,
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "token_logprobs": gen.token_logprobs,
        "top_logprobs": gen.top_logprobs,
        "prompt_logprobs": gen.prompt_logprobs,
    }


async def _result(response):
    """A DeploymentResponse as a coroutine (what asyncio.wait_for takes)."""
    return await response


class AdapterSlot:
    """What Serve's multiplexer holds per adapter; its eviction deletes the adapter from the
    model (Serve calls `__del__` when it drops a model from its LRU)."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.name = engine, name
        self.inner = engine.adapters[name]

    def __del__(self):
        # only this load of the adapter: a later reload under the same name has its own slot
        if self.engine.adapters.get(self.name) == self.inner:
            self.engine.unload_adapter(self.name)


def model_deployment(spec: ServeSpec):
    """The model deployment class, with the spec's batching and multiplexing settings."""
    replicas = spec.replicas

    @serve.deployment(name="model", **spec.model_options())
    class ModelServer:
        def __init__(self, spec_json: dict):
            self.spec = ServeSpec.model_validate(spec_json)
            if not self.spec.replicas.gpus:
                torch.set_num_threads(self.spec.replicas.torch_threads)
            self.base = resolve_model(self.spec.model)
            dtype = torch.bfloat16 if self.spec.replicas.gpus else torch.float32
            # Serve's multiplexer decides evictions; the engine's own cap is a backstop
            self.engine = Engine(self.base.path, self.spec.replicas.max_adapters + 1, dtype)
            self.gate = Gate(self.base, self.spec.gate)
            self.in_flight = 0  # generations this replica is running now
            batching = self.spec.batching
            self.batcher = Batcher(
                self.engine.generate, batching.max_batch_size, batching.batch_wait_timeout_s
            )

        @serve.multiplexed(max_num_models_per_replica=replicas.max_adapters)
        async def adapter(self, name: str) -> AdapterSlot:
            verdict, artifact = self.gate.check(name, self.spec.registries)
            log.info("gate %s: %s", name, verdict.to_json())
            if not verdict.servable:
                raise ApiError(400, verdict.reason, code="adapter_not_servable", param="model")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.engine.load_adapter, name, artifact.path)
            return AdapterSlot(self.engine, name)

        async def _request(self, payload: dict, on_text=None) -> GenerationRequest:
            name = serve.get_multiplexed_model_id() or None
            if name:
                await self.adapter(name)
            return GenerationRequest(
                prompt_ids=payload["prompt_ids"],
                adapter=name,
                max_new_tokens=payload["max_new_tokens"],
                temperature=payload["temperature"],
                top_p=payload["top_p"],
                seed=payload.get("seed"),
                stop=payload.get("stop", []),
                logprobs=payload.get("logprobs"),
                echo_logprobs=payload.get("echo", False),
                on_text=on_text,
            )

        async def generate(self, payload: dict) -> dict:
            self.in_flight += 1
            try:
                return _generation_json(await self.batcher.submit(await self._request(payload)))
            finally:
                self.in_flight -= 1

        async def generate_stream(self, payload: dict):
            """Text pieces as they are generated, then the whole generation."""
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            request = await self._request(
                payload, lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)
            )
            task = asyncio.ensure_future(self.batcher.submit(request))
            task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
            while (piece := await queue.get()) is not None:
                yield {"text": piece}
            yield {"final": _generation_json(task.result())}

        def stats(self) -> dict:
            return {
                **vars(self.engine.stats),
                "adapters": self.engine.loaded_adapters(),
                "in_flight": self.in_flight,
                "replica": serve.get_replica_context().replica_id.unique_id,
            }

        def check_health(self) -> None:
            """A replica is healthy when its base still generates a token."""
            ids = self.engine.tokenizer("ok")["input_ids"]
            self.engine.generate([GenerationRequest(ids, None, max_new_tokens=1)])

    return ModelServer


# ---- the ingress ---------------------------------------------------------------------------


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    """Whatever else went wrong still answers in OpenAI's error shape (500), logged whole."""
    log.error("request to %s failed", request.url.path, exc_info=e)
    body = ApiError(500, f"internal error ({type(e).__name__}): {e}", "server_error").body()
    return JSONResponse(body, status_code=500)


class SpecCors:
    """CORS as the serve spec says: none unless `cors_origins` lists origins (Starlette's
    CORSMiddleware over those). The spec is known only when the ingress starts, after this
    module made the app, so the ingress puts its origins on the app's state."""

    def __init__(self, app):
        self.app, self.cors = app, None

    async def __call__(self, scope, receive, send):
        origins = getattr(scope["app"].state, "cors_origins", None) if "app" in scope else None
        if not origins or scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.cors is None:
            self.cors = CORSMiddleware(
                self.app,
                allow_origins=origins,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=["x-request-id", "Retry-After"],
            )
        return await self.cors(scope, receive, send)


@functools.cache
def _metrics() -> SimpleNamespace:
    """This ingress process's Ray metrics, exported for Prometheus by Ray's metrics agent
    (Serve adds the application, deployment and replica tags; Ray prefixes `ray_`). Made on
    first use, inside the replica."""
    return SimpleNamespace(
        requests=serve_metrics.Counter(
            "ftservice_requests",
            description="Requests by model (adapter or base), route and HTTP status.",
            tag_keys=("model", "route", "status"),
        ),
        tokens=serve_metrics.Counter(
            "ftservice_tokens",
            description="Prompt and completion tokens by model.",
            tag_keys=("model", "kind"),
        ),
        latency=serve_metrics.Histogram(
            "ftservice_request_latency_ms",
            description="Time to the response (to its first byte for streams), by model.",
            boundaries=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
            tag_keys=("model", "route"),
        ),
    )


@api.middleware("http")
async def _access(request: Request, call_next):
    """One access line and the request metrics for every request, refused ones included: a
    request id (Serve's, which it sends back as x-request-id), the key's name, the route, the
    model the route resolved, the status, the time and the response's id; the prompt only
    where the spec allows."""
    request.state.t0 = time.time()
    response = await call_next(request)
    if request.url.path == "/health":
        return response
    state = request.state
    route = getattr(request.scope.get("route"), "path", "-")
    model = getattr(state, "model", "-")
    ms = (time.time() - state.t0) * 1000
    prompt = getattr(state, "prompt", None)
    log.info(
        "request %s key=%s route=%s model=%s status=%d ms=%.0f id=%s%s",
        _get_serve_request_context().request_id,
        getattr(state, "key", "-"),
        route,
        model,
        response.status_code,
        ms,
        getattr(state, "response_id", "-"),
        f" prompt={prompt!r}" if prompt is not None else "",
    )
    metrics = _metrics()
    metrics.requests.inc(tags={"model": model, "route": route, "status": str(response.status_code)})
    metrics.latency.observe(ms, tags={"model": model, "route": route})
    return response


api.add_middleware(SpecCors)  # outermost: answers preflights before any route


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress(ArenaRoutes, FineTuneRoutes, JobRoutes):
    def __init__(self, spec_json: dict, model):
        self.spec = ServeSpec.model_validate(spec_json)
        self.model = model
        api.state.cors_origins = self.spec.cors_origins
        self.store = open_store(self.spec.store.url)
        self.base = resolve_model(self.spec.model)
        self.base_name = self.spec.base_name or self.spec.model.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        self.gate = Gate(self.base, self.spec.gate)
        self.context = getattr(self.tokenizer, "model_max_length", 0) or 0
        cfg = json.loads((self.base.path / "config.json").read_text())
        self.context = cfg.get("max_position_embeddings") or self.context
        self._verdicts: dict[tuple, dict] = {}
        self._listing: list[dict] = []
        self._listed_at = -1e9
        self._tokenizers: dict[str, object] = {}
        self.created = int(time.time())
        self.retries = 0  # replica deaths this ingress met under its requests (sent again)
        self.plot_dir = tempfile.mkdtemp(prefix="ftservice-plots-")
        self._aliases: dict = {}
        self._aliases_read_at = -1e9
        self._alias_rng = random.Random()
        self.arena_setup()

    # ---- who may call ------------------------------------------------------------------------

    def caller(self, request: Request, scope: str) -> Caller:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer KEY'",
                "invalid_request_error",
                "invalid_api_key",
            )
        caller = authenticate(self.store, header[7:].strip())
        if caller is None:
            raise ApiError(
                401, "incorrect API key provided", "invalid_request_error", "invalid_api_key"
            )
        request.state.key = caller.name
        if scope not in caller.scopes:
            raise ApiError(
                403,
                f"key '{caller.name}' lacks the '{scope}' scope this route needs",
                "permission_error",
                "insufficient_scope",
            )
        self.limit(caller, caller.requests_per_minute or self.spec.limits.requests_per_minute)
        return caller

    def limit(self, caller: Caller, per_minute: int | None) -> None:
        """Count the request against the caller's per-minute limit; 429 with Retry-After."""
        if per_minute is None:
            return
        wait = take_request(self.store, caller, per_minute)
        if wait is not None:
            raise ApiError(
                429,
                f"rate limit of {per_minute} requests per minute reached",
                "rate_limit_exceeded",
                "rate_limit_exceeded",
                headers={"Retry-After": str(int(wait + 0.999))},
            )

    async def body(self, request: Request, model):
        raw = await request.body()
        if len(raw) > self.spec.limits.max_request_bytes:
            raise ApiError(
                413,
                f"request body of {len(raw)} bytes is over the limit of "
                f"{self.spec.limits.max_request_bytes}",
                code="request_too_large",
            )
        try:
            return model.model_validate_json(raw)
        except ValueError as e:
            errors = getattr(e, "errors", lambda: [])()
            param = ".".join(str(x) for x in errors[0]["loc"]) if errors else None
            msg = errors[0]["msg"] if errors else str(e)
            raise ApiError(400, f"{param}: {msg}" if param else msg, param=param) from None

    # ---- which adapters -----------------------------------------------------------------------

    def disabled(self) -> set[str]:
        with self.store() as session:
            rows = session.scalars(
                select(DisabledAdapter.name).where(DisabledAdapter.app == self.spec.name)
            )
            return set(rows)

    def verdicts(self, fresh: bool = False) -> list[dict]:
        """The gate's verdict on every wanted artifact of the registries, published after
        start included (each checked once per published version; the listing is at most
        LISTING_TTL_S old unless `fresh`)."""
        if not fresh and time.monotonic() - self._listed_at < LISTING_TTL_S:
            return self._listing
        out = []
        for registry, artifact in candidates(self.spec):
            key = (artifact.location, artifact.meta.created)
            if key not in self._verdicts:
                verdict, _ = self.gate.check(artifact.name, [registry])
                log.info("gate %s: %s", artifact.name, verdict.to_json())
                self._verdicts[key] = verdict.to_json() | {"meta": artifact.meta}
            out.append(self._verdicts[key])
        self._listing, self._listed_at = out, time.monotonic()
        return out

    def resolve(self, model: str, request: Request | None = None) -> str | None:
        """None for the base, else the adapter's name; ApiError when it cannot be served.
        The request's access line and metrics then name what it was served by."""
        name = self._resolve(model)
        if request is not None:
            request.state.model = name or self.base_name
        return name

    def aliases(self) -> dict:
        """The app's aliases as they point now (read at most every ALIAS_TTL_S)."""
        if time.monotonic() - self._aliases_read_at >= ALIAS_TTL_S:
            self._aliases = rounds.aliases(self.store, self.spec.name)
            self._aliases_read_at = time.monotonic()
        return self._aliases

    def _resolve(self, model: str) -> str | None:
        alias = self.aliases().get(model)
        if alias is not None:  # a stable name: its target, or its canary for a share of calls
            canary = alias.canary and self._alias_rng.random() < alias.canary_share
            model = alias.canary if canary else alias.target
        if model == self.base_name:
            return None
        name = model
        if ":" in model:
            base, _, name = model.partition(":")
            if base != self.base_name:
                raise ApiError(
                    404,
                    f"the model '{model}' does not exist: this app serves the "
                    f"base '{self.base_name}'",
                    code="model_not_found",
                    param="model",
                )
        try:
            check_name(name)
        except Exception as e:
            raise ApiError(400, str(e), code="invalid_model_name", param="model") from None
        found = [v for v in self.verdicts() if v["name"] == name]
        if not found:  # published a moment ago: look again before saying no
            found = [v for v in self.verdicts(fresh=True) if v["name"] == name]
        if not found or name in self.disabled():
            raise ApiError(
                404,
                f"the model '{model}' does not exist; GET /v1/models lists what this app serves",
                code="model_not_found",
                param="model",
            )
        if not found[0]["servable"]:
            raise ApiError(
                400,
                f"the adapter '{name}' cannot be served: {found[0]['reason']}",
                code="adapter_not_servable",
                param="model",
            )
        return name

    def tokenizer_for(self, adapter: str | None):
        """The artifact's own tokenizer and chat template (the base's for the base)."""
        if adapter is None:
            return self.tokenizer, None
        verdict = next(v for v in self.verdicts() if v["name"] == adapter)
        if adapter not in self._tokenizers:
            folder = localize(verdict["location"])
            has_own = (folder / "tokenizer_config.json").is_file()
            self._tokenizers[adapter] = (
                AutoTokenizer.from_pretrained(folder) if has_own else self.tokenizer
            )
        system = JobSpec.model_validate(verdict["meta"].spec).data.system_prompt
        return self._tokenizers[adapter], system

    # ---- generation ---------------------------------------------------------------------------

    def payload(self, prompt_ids, max_tokens, req, adapter, **extra) -> dict:
        limits, gen = self.spec.limits, self.spec.generation
        max_new = gen.max_tokens if max_tokens is None else max_tokens
        if max_new > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_new} is over this app's limit of {limits.max_tokens}",
                param="max_tokens",
            )
        cap = min(limits.max_prompt_tokens or self.context, self.context)
        if len(prompt_ids) + max_new > self.context or len(prompt_ids) > cap:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.context} tokens "
                f"(prompts at most {cap}); the request has {len(prompt_ids)} prompt "
                f"tokens and asks for {max_new} more",
                code="context_length_exceeded",
                param="messages",
            )
        temperature = gen.temperature if req.temperature is None else req.temperature
        return {
            "prompt_ids": prompt_ids,
            "max_new_tokens": max_new,
            "temperature": temperature,
            "top_p": gen.top_p if req.top_p is None else req.top_p,
            "seed": req.seed,
            "stop": stops(req.stop),
            **extra,
        }

    def located(self, payload: dict, adapter: str | None) -> dict:
        """The payload with the gate-approved adapter's location (a vLLM replica loads it
        from there; the transformers replica gates and finds it itself)."""
        if adapter is None:
            return payload
        verdict = next(v for v in self.verdicts() if v["name"] == adapter)
        return {**payload, "adapter_location": verdict["location"]}

    def handle(self, adapter: str | None, stream: bool = False):
        return self.model.options(stream=stream, multiplexed_model_id=adapter or "")

    def timed_out(self) -> ApiError:
        timeout = self.spec.limits.request_timeout_s
        return ApiError(
            408,
            f"the request took longer than this app's limit of {timeout:g} s; ask for fewer "
            "tokens or try again when the app is less busy",
            "timeout",
            "request_timeout",
        )

    async def run(self, adapter: str | None, payload: dict, t0: float) -> dict:
        """One generation, sent again if its replica died while running it, cancelled (408)
        at the spec's deadline counted from t0 (the replica drops it unless it is running)."""
        payload = self.located(payload, adapter)
        for attempt in range(RETRIES + 1):
            response = self.handle(adapter).generate.remote(payload)
            left = t0 + self.spec.limits.request_timeout_s - time.time()
            try:
                return await asyncio.wait_for(_result(response), max(left, 0))
            except TimeoutError:
                response.cancel()
                raise self.timed_out() from None
            except RayActorError:  # ActorDiedError among them
                self.retries += 1
                log.warning("replica died under a request (attempt %d)", attempt + 1)
            except BackPressureError:
                raise ApiError(
                    503,
                    "too many requests queued; try again shortly",
                    "server_error",
                    headers={"Retry-After": "1"},
                ) from None
        raise ApiError(
            503, "the model replica died; try again", "server_error", headers={"Retry-After": "1"}
        )

    def usage(self, caller: Caller, model: str, prompt: int, completion: int) -> dict:
        """Counted for the key (in the store) and for the model (in the metrics)."""
        record_usage(self.store, caller, prompt, completion)
        tokens = _metrics().tokens
        for kind, count in (("prompt", prompt), ("completion", completion)):
            if count:  # a Ray counter refuses 0 (an answer that is EOS at once has no token)
                tokens.inc(count, tags={"model": model, "kind": kind})
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # ---- routes -------------------------------------------------------------------------------

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    def models(self, request: Request) -> dict:
        self.caller(request, "inference")
        disabled = self.disabled()
        data = [
            {
                "id": self.base_name,
                "object": "model",
                "created": self.created,
                "owned_by": "ftservice",
                "root": self.base_name,
                "parent": None,
                "servable": True,
            }
        ]
        for v in self.verdicts(fresh=True):
            if v["name"] in disabled:
                continue
            meta = v["meta"]
            created = datetime.fromisoformat(meta.created.replace("Z", "+00:00"))
            data.append(
                {
                    "id": v["name"],
                    "object": "model",
                    "created": int(created.timestamp()),
                    "owned_by": "ftservice",
                    "root": v["name"],
                    "parent": self.base_name,
                    "servable": v["servable"],
                    "gate": {k: v[k] for k in ("servable", "reason", "checks", "probe_kl")},
                    "lineage": {
                        "parent_artifact": meta.parent,
                        "method": meta.spec["method"],
                        "stage": meta.spec["stage"],
                        "sweep": meta.lineage.model_dump() if meta.lineage else None,
                    },
                }
            )
        for name, alias in self.aliases().items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "ftservice",
                    "root": alias.target,
                    "parent": self.base_name,
                    "servable": True,
                    "alias": {
                        "target": alias.target,
                        "canary": alias.canary,
                        "canary_share": alias.canary_share,
                    },
                }
            )
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        t0, rid = request.state.t0, f"chatcmpl-{uuid.uuid4().hex[:24]}"
        request.state.response_id = rid
        caller = await asyncio.to_thread(self.caller, request, "inference")
        req = await self.body(request, ChatCompletionRequest)
        adapter = await asyncio.to_thread(self.resolve, req.model, request)
        ids, messages = await asyncio.to_thread(self.chat_prompt, req, adapter)
        if self.spec.log_prompts:
            request.state.prompt = messages[-1]["content"]
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        payload = self.payload(list(ids), max_tokens, req, adapter)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self.stream(
                rid, caller, req.model, adapter, payload, "chat.completion.chunk", include_usage, t0
            )
        out = await self.run(adapter, payload, t0)
        usage = await asyncio.to_thread(
            self.usage, caller, request.state.model, out["prompt_tokens"], out["completion_tokens"]
        )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(t0),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["text"]},
                    "finish_reason": out["finish_reason"],
                    "logprobs": None,
                }
            ],
            "usage": usage,
        }

    def chat_prompt(self, req: ChatCompletionRequest, adapter: str | None):
        """Prompt token ids with the artifact's chat template (and its training system
        prompt when the request brings none), and the messages they came from."""
        tokenizer, trained_system = self.tokenizer_for(adapter)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        if (
            trained_system
            and self.spec.generation.system_prompt == "trained"
            and messages[0]["role"] != "system"
        ):
            messages = [{"role": "system", "content": trained_system}, *messages]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return ids, messages

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        t0, rid = request.state.t0, f"cmpl-{uuid.uuid4().hex[:24]}"
        request.state.response_id = rid
        caller = await asyncio.to_thread(self.caller, request, "inference")
        req = await self.body(request, CompletionRequest)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", param="prompt")
            req.prompt = req.prompt[0]
        adapter = await asyncio.to_thread(self.resolve, req.model, request)
        tokenizer, _ = await asyncio.to_thread(self.tokenizer_for, adapter)
        ids = tokenizer(req.prompt)["input_ids"]
        if self.spec.log_prompts:
            request.state.prompt = req.prompt
        payload = self.payload(
            ids,
            req.max_tokens,
            req,
            adapter,
            logprobs=req.logprobs,
            echo=req.echo and req.logprobs is not None,
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self.stream(
                rid, caller, req.model, adapter, payload, "text_completion", include_usage, t0
            )
        out = await self.run(adapter, payload, t0)
        text = (req.prompt if req.echo else "") + out["text"]
        logprobs = None
        if req.logprobs is not None:
            logprobs = self.completion_logprobs(tokenizer, ids if req.echo else [], out, req)
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(t0),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "finish_reason": out["finish_reason"],
                    "logprobs": logprobs,
                }
            ],
            "usage": await asyncio.to_thread(
                self.usage,
                caller,
                request.state.model,
                out["prompt_tokens"],
                out["completion_tokens"],
            ),
        }

    def completion_logprobs(self, tokenizer, prompt_ids, out, req) -> dict:
        """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs and
        text_offset, over the echoed prompt (when asked) and the generated tokens."""
        ids = [*prompt_ids, *out["token_ids"]]
        tokens = [tokenizer.decode([t]) for t in ids]
        values = [
            *(out["prompt_logprobs"] or [] if prompt_ids else []),
            *(out["token_logprobs"] or []),
        ]
        tops = [None] * len(prompt_ids) if prompt_ids else []
        for top in out["top_logprobs"] or [{}] * len(out["token_ids"]):
            tops.append({tokenizer.decode([int(t)]): v for t, v in top.items()} or None)
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def stream(self, rid, caller, model, adapter, payload, kind, include_usage, t0):
        chat = kind == "chat.completion.chunk"

        def chunk(delta: str | None, finish: str | None = None, usage=None) -> str:
            if chat:
                choice = {
                    "index": 0,
                    "delta": {} if delta is None else {"content": delta},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "finish_reason": finish,
                    "logprobs": None,
                }
            body = {
                "id": rid,
                "object": kind,
                "created": int(t0),
                "model": model,
                "choices": [] if usage else [choice],
            }
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            final = None
            try:
                if chat:
                    opening = {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                    head = {
                        "id": rid,
                        "object": kind,
                        "created": int(t0),
                        "model": model,
                        "choices": [opening],
                    }
                    yield f"data: {json.dumps(head)}\n\n"
                located = self.located(payload, adapter)
                pieces = self.handle(adapter, stream=True).generate_stream.remote(located)
                while True:
                    left = t0 + self.spec.limits.request_timeout_s - time.time()
                    try:
                        item = await asyncio.wait_for(pieces.__anext__(), max(left, 0))
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        pieces.cancel()
                        raise self.timed_out() from None
                    if "text" in item:
                        yield chunk(item["text"])
                    else:
                        final = item["final"]
                yield chunk(None, final["finish_reason"])
                served = adapter or self.base_name
                usage = self.usage(
                    caller, served, final["prompt_tokens"], final["completion_tokens"]
                )
                if include_usage:
                    yield chunk(None, usage=usage)
            except Exception as e:  # a broken stream ends with an error event, never a hang
                log.warning("stream %s broke: %r", rid, e)
                if not isinstance(e, ApiError):
                    e = ApiError(500, f"generation failed: {e}", "server_error")
                error = e.body()
                yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/load_lora_adapter")
    async def load_adapter(self, request: Request) -> dict:
        caller = await asyncio.to_thread(self.caller, request, "admin")
        req = await self.body(request, LoadAdapterRequest)
        with self.store.begin() as session:
            session.execute(
                delete(DisabledAdapter).where(
                    DisabledAdapter.app == self.spec.name, DisabledAdapter.name == req.lora_name
                )
            )
        adapter = self.resolve(req.lora_name, request)
        # warm it on a replica: the gate runs there too, and the adapter is loaded
        ids = self.tokenizer("ok")["input_ids"]
        warm = {"prompt_ids": ids, "max_new_tokens": 1, "temperature": 0.0, "top_p": 1.0}
        await self.run(adapter, warm, time.time())
        log.info("adapter %s loaded by key %s", adapter, caller.name)
        return {"status": "loaded", "lora_name": adapter}

    @api.post("/v1/unload_lora_adapter")
    async def unload_adapter(self, request: Request) -> dict:
        caller = await asyncio.to_thread(self.caller, request, "admin")
        req = await self.body(request, LoadAdapterRequest)
        self.resolve(req.lora_name, request)
        with self.store.begin() as session:
            session.merge(
                DisabledAdapter(
                    app=self.spec.name,
                    name=req.lora_name,
                    disabled_at=datetime.now(UTC),
                    by_key=caller.name,
                )
            )
        log.info("adapter %s unloaded by key %s", req.lora_name, caller.name)
        return {"status": "unloaded", "lora_name": req.lora_name}

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict:
        """The engine counters of one model replica (admin): forward passes, mixed ones."""
        self.caller(request, "admin")
        return {**await self.model.stats.remote(), "ingress_retries": self.retries}


def build_app(spec: ServeSpec):
    """The Serve application for a serve spec: `serve.run(build_app(spec))`."""
    spec_json = spec.model_dump(mode="json")
    if spec.backend == "vllm":
        model = vllm_deployment(spec).bind(vllm_settings(spec))
    else:
        model = model_deployment(spec).bind(spec_json)
    return Ingress.options(
        ray_actor_options={"num_cpus": spec.replicas.ingress_cpus},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
    ).bind(spec_json, model)


def app_builder(args: ServeSpec):
    """Ray's application builder: `import_path: ftservice.serve.app:app_builder` with the
    serve spec as `args` (Serve validates them into a ServeSpec), as `ftservice serve
    deploy` and cluster/kuberay/rayservice.yaml run it."""
    return build_app(args)
