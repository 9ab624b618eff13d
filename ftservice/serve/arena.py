"""The comparison page (/arena) and its API, on the serving app: annotators sign in with their
key (exchanged for an HttpOnly, SameSite=Strict session cookie; posts carry a CSRF token),
get comparisons the server issues (prompt, two models shown blind as A and B, the seed),
watch both answers stream side by side, and vote. The answers and votes go to the store."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import secrets
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ftservice.feedback import rounds
from ftservice.feedback import votes as store_votes
from ftservice.feedback.campaign import (
    CampaignSpec,
    answer_slots,
    competitors,
    distractors,
    load_prompts,
    load_references,
)
from ftservice.feedback.leaderboard import fit_ratings, leaderboard, outcomes, plots
from ftservice.feedback.quality import counted_votes
from ftservice.feedback.simulate import SIMULATED_PROJECT
from ftservice.serve.api import api
from ftservice.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    NextRequest,
    SignInRequest,
    VoteRequest,
)
from ftservice.storage import localize
from ftservice.store.keys import (
    Caller,
    authenticate,
    close_session,
    open_session,
    session_caller,
)

STATIC = Path(__file__).parent / "static"
PAGES = {"arena.js", "arena.css", "leaderboard.js"}
COOKIE = "ftservice_session"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
LEADERBOARD_TTL_S = 5.0
LEADERBOARD_RESAMPLES = 200
RATINGS_TTL_S = 30.0
CAMPAIGNS_TTL_S = 3.0


def _page(name: str) -> FileResponse:
    return FileResponse(
        STATIC / name,
        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                 "Cache-Control": "no-store", "Referrer-Policy": "same-origin"},
    )  # fmt: skip


@functools.cache
def _file_digest(path: str, version: int) -> str:
    """sha256 prefix of a file; `version` (its mtime) keys the cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _page_scope(request: Request, caller: Caller) -> None:
    """The page is for annotator (and admin) keys."""
    request.state.key = caller.name
    if not {"annotator", "admin"} & caller.scopes:
        raise ApiError(
            403,
            f"key '{caller.name}' lacks the 'annotator' scope the page needs",
            "permission_error",
            "insufficient_scope",
        )


def gold_pairs(spec: CampaignSpec) -> dict[str, tuple[str, str]]:
    """prompt id -> (its reference answer, a distractor) for the campaign's gold comparisons."""
    if not spec.quality.enabled or not spec.quality.gold_share or not spec.prompts:
        return {}
    references = load_references(spec.prompts)
    return {k: (references[k].output, wrong) for k, wrong in distractors(references).items()}


ADMIN_ONLY = ("annotators", "quality")
"""Leaderboard parts that name annotators: shown to admins only."""
GOLD_WORD_S = 0.02
"""A gold comparison's stored answers stream a word at a time, as generated ones do."""


def _feedback_error(e: store_votes.FeedbackError) -> ApiError:
    return ApiError(e.status, str(e), "invalid_request_error", e.code)


class ArenaRoutes:
    """The page's routes; mixed into the ingress (self.store, self.spec, self.resolve, ...)."""

    def arena_setup(self) -> None:
        self.campaigns: dict[str, CampaignSpec] = {c.name: c for c in self.spec.campaigns}
        self.campaign_prompts = {c.name: load_prompts(c) for c in self.spec.campaigns}
        self.campaign_gold = {c.name: gold_pairs(c) for c in self.spec.campaigns}
        for c in self.spec.campaigns:
            store_votes.declare_campaign(self.store, self.spec.name, self.base_name, c)
        self._campaigns_read_at = -1e9
        self._rng = random.Random(secrets.randbits(64))
        self._boards: dict[str, tuple[float, dict]] = {}
        self._ratings: dict[str, tuple[float, dict[str, float]]] = {}
        # (item, model) -> the generation of that answer running in this ingress: a second
        # annotator of the same item waits for it and is shown the stored answer, so what
        # every annotator saw is what their vote keeps
        self._generating: dict[tuple[str, str], asyncio.Future] = {}

    # ---- who ------------------------------------------------------------------------------

    def annotator(self, request: Request, post: bool, campaign: str | None = None) -> Caller:
        """The caller of a page request: a Bearer key (programs) or the session cookie (the
        page; posts must carry its CSRF token in X-CSRF-Token). Annotator or admin scope."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and header[7:].strip():
            caller = authenticate(self.store, header[7:].strip())
            if caller is None:
                raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
        else:
            found = session_caller(self.store, request.cookies.get(COOKIE, ""))
            if found is None:
                raise ApiError(
                    401, "not signed in: sign in on /arena with your key", code="not_signed_in"
                )
            caller, csrf = found
            sent = request.headers.get("x-csrf-token", "")
            if post and not secrets.compare_digest(sent.encode(), csrf.encode()):
                raise ApiError(
                    403, "missing or wrong X-CSRF-Token for this session", "permission_error",
                    "csrf_failed",
                )  # fmt: skip
        _page_scope(request, caller)
        if campaign is not None:
            self.campaign(campaign)
            if "admin" not in caller.scopes and campaign not in store_votes.annotator_campaigns(
                self.store, caller.name
            ):
                raise ApiError(
                    403,
                    f"'{caller.name}' is not an annotator of campaign '{campaign}'",
                    "permission_error",
                    "not_in_campaign",
                )
        limits = [self.campaigns[campaign].requests_per_minute] if campaign else [
            c.requests_per_minute for c in self.campaigns.values()]  # fmt: skip
        self.limit(caller, caller.requests_per_minute or (min(limits) if limits else None))
        return caller

    def refresh_campaigns(self) -> None:
        """Add the campaigns declared for this app in the store since it started (a loop
        declares its campaign so; the serve spec's own are declared at start)."""
        if time.monotonic() - self._campaigns_read_at < CAMPAIGNS_TTL_S:
            return
        for spec in store_votes.app_campaigns(self.store, self.spec.name):
            if spec.name not in self.campaigns:
                self.campaign_prompts[spec.name] = load_prompts(spec)
                self.campaign_gold[spec.name] = gold_pairs(spec)
                self.campaigns[spec.name] = spec
        self._campaigns_read_at = time.monotonic()

    def campaign(self, name: str) -> CampaignSpec:
        if name not in self.campaigns:
            self._campaigns_read_at = -1e9
            self.refresh_campaigns()
        if name not in self.campaigns:
            raise ApiError(
                404,
                f"no campaign '{name}' on this app (it runs: "
                f"{', '.join(self.campaigns) or 'none'})",
                code="campaign_not_found",
            )
        return self.campaigns[name]

    def me(self, caller: Caller, csrf: str | None) -> dict:
        self.refresh_campaigns()
        mine = store_votes.annotator_campaigns(self.store, caller.name)
        if "admin" in caller.scopes:
            mine = list(self.campaigns)
        shown = [c for c in mine if c in self.campaigns]
        return {
            "annotator": caller.name,
            "csrf": csrf,
            "campaigns": [self.campaign_state(self.campaigns[c], caller.name) for c in shown],
        }

    def campaign_state(self, spec: CampaignSpec, annotator: str) -> dict:
        return {
            "name": spec.name,
            "done": store_votes.progress(self.store, spec.name, annotator),
            "quota": spec.quota,
            "allow_custom_prompts": spec.allow_custom_prompts,
            "max_comment_chars": spec.max_comment_chars,
        }

    # ---- which models ---------------------------------------------------------------------

    def contenders(self, spec: CampaignSpec) -> tuple[list[str], dict[str, str | None]]:
        """The campaign's servable models (the base by its name) and their fingerprints (an
        adapter's: of its weights file; the base's: of its folder)."""
        disabled = self.disabled()
        listing = {v["name"]: v for v in self.verdicts() if v["servable"]}
        names = [self.base_name, *[n for n in listing if n not in disabled]]
        chosen = competitors(spec, names)
        prints: dict[str, str | None] = {self.base_name: self.base.fingerprint}
        for name in chosen:
            if name in listing:
                weights = localize(listing[name]["location"]) / "adapter_model.safetensors"
                prints[name] = (
                    _file_digest(str(weights), weights.stat().st_mtime_ns)
                    if weights.is_file()
                    else None
                )
        return chosen, prints

    def ratings(self, campaign: str) -> dict[str, float]:
        """Current ratings for adaptive pair choice (a plain fit, no bootstrap), refreshed at
        most every RATINGS_TTL_S."""
        cached = self._ratings.get(campaign)
        if cached is not None and time.monotonic() - cached[0] < RATINGS_TTL_S:
            return cached[1]
        rows, items = store_votes.effective_rows(self.store, campaign)
        # no gold comparison and no unreliable annotator moves the pairs chosen
        games = outcomes(counted_votes(rows, items, self.campaign(campaign).quality).votes)
        models = sorted({m for i, j, _ in games for m in (i, j)})
        ratings = fit_ratings(games, models, self.base_name) if len(models) >= 2 else {}
        self._ratings[campaign] = (time.monotonic(), ratings)
        return ratings

    # ---- pages ----------------------------------------------------------------------------

    @api.get("/arena")
    def arena_page(self):
        return _page("arena.html")

    @api.get("/arena/leaderboard")
    def leaderboard_page(self):
        return _page("leaderboard.html")

    @api.get("/arena/static/{name}")
    def arena_static(self, name: str):
        if name not in PAGES:
            raise ApiError(404, f"no file '{name}'", code="not_found")
        return _page(name)

    # ---- sign-in --------------------------------------------------------------------------

    @api.post("/arena/api/session")
    async def sign_in(self, request: Request):
        req = await self.body(request, SignInRequest)
        caller = await asyncio.to_thread(authenticate, self.store, req.token.strip())
        if caller is None:
            raise ApiError(401, "unknown or revoked key", code="invalid_api_key")
        _page_scope(request, caller)
        if caller.key_id is None:
            raise ApiError(
                403,
                "keys from FTSERVICE_API_KEYS cannot sign in to the page; make an annotator "
                "key: ftservice feedback annotators add NAME --campaign C",
                "permission_error",
                "insufficient_scope",
            )
        cookie, csrf = await asyncio.to_thread(open_session, self.store, caller)
        response = JSONResponse(await asyncio.to_thread(self.me, caller, csrf))
        response.set_cookie(
            COOKIE, cookie, httponly=True, samesite="strict", path="/arena",
            secure=request.url.scheme == "https", max_age=12 * 3600,
        )  # fmt: skip
        return response

    @api.get("/arena/api/session")
    async def session_info(self, request: Request):
        found = await asyncio.to_thread(session_caller, self.store, request.cookies.get(COOKIE, ""))
        if found is None:
            raise ApiError(401, "not signed in", code="not_signed_in")
        caller, csrf = found
        request.state.key = caller.name
        return await asyncio.to_thread(self.me, caller, csrf)

    @api.delete("/arena/api/session")
    async def sign_out(self, request: Request):
        await asyncio.to_thread(self.annotator, request, True)
        await asyncio.to_thread(close_session, self.store, request.cookies.get(COOKIE, ""))
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/arena")
        return response

    # ---- comparisons ----------------------------------------------------------------------

    def comparison_json(self, issued: store_votes.Issued, spec: CampaignSpec, who: str) -> dict:
        c = issued.comparison
        return {
            "id": c.id,
            "campaign": c.campaign,
            "prompt": json.loads(c.prompt),
            "custom": c.prompt_id == "custom",
            "progress": self.campaign_state(spec, who),
        }

    @api.post("/arena/api/campaigns/{name}/next")
    async def next_comparison(self, name: str, request: Request):
        caller = await asyncio.to_thread(self.annotator, request, True, name)
        spec = self.campaigns[name]
        req = await self.body(request, NextRequest)
        custom = None
        if req.prompt is not None:
            if not spec.allow_custom_prompts:
                raise ApiError(
                    403,
                    f"campaign '{name}' does not take typed prompts",
                    "permission_error",
                    "custom_prompts_off",
                )
            text = req.prompt.strip()
            if not text:
                raise ApiError(400, "prompt: empty", param="prompt")
            if len(text) > spec.max_prompt_chars:
                raise ApiError(
                    413,
                    f"prompt of {len(text)} characters is over the campaign's limit of "
                    f"{spec.max_prompt_chars}",
                    code="prompt_too_long",
                    param="prompt",
                )
            custom = [{"role": "user", "content": text}]
        models, prints = await asyncio.to_thread(self.contenders, spec)
        loop_round = await asyncio.to_thread(rounds.latest_round, self.store, name)
        if loop_round is not None:
            state = await asyncio.to_thread(self.campaign_state, spec, caller.name)
            if loop_round.phase != "voting":
                return {"done": True, "progress": state,
                        "waiting": f"round {loop_round.round} is closed; the loop is training "
                                   "the next model: come back in a few minutes"}  # fmt: skip
            count = await asyncio.to_thread(
                rounds.round_vote_count, self.store, name, loop_round.round
            )
            if count >= loop_round.quota:
                return {"done": True, "progress": state,
                        "waiting": f"round {loop_round.round} has its {loop_round.quota} "
                                   "votes; the next round opens after training"}  # fmt: skip
            models = [m for m in models if m in loop_round.models]
        least = 1 if spec.self_pairs else 2  # a self pair is one model's two samples
        if len(models) < least:
            wanted = "a servable model" if least == 1 else "two servable models"
            raise ApiError(
                503,
                f"campaign '{name}' needs {wanted}; it has {', '.join(models) or 'none'} "
                "(see GET /v1/models)",
                "server_error",
                "not_enough_models",
            )
        ratings = await asyncio.to_thread(self.ratings, name) if spec.pairs == "adaptive" else {}
        try:
            issued = await asyncio.to_thread(
                store_votes.issue, self.store, spec, caller.name, models, prints,
                self.campaign_prompts[name], self._rng, ratings, custom,
                loop_round and loop_round.round, loop_round and loop_round.focus,
                self.campaign_gold[name],
            )  # fmt: skip
        except store_votes.FeedbackError as e:
            raise _feedback_error(e) from None
        if issued is None:
            state = await asyncio.to_thread(self.campaign_state, spec, caller.name)
            return {"done": True, "progress": state}
        return await asyncio.to_thread(self.comparison_json, issued, spec, caller.name)

    @api.get("/arena/api/comparisons/{cid}/stream")
    async def stream_comparison(self, cid: str, request: Request):
        caller = await asyncio.to_thread(self.annotator, request, False)
        try:
            issued = await asyncio.to_thread(store_votes.comparison_for, self.store, cid,
                                             caller.name)  # fmt: skip
        except store_votes.FeedbackError as e:
            raise _feedback_error(e) from None
        c = issued.comparison
        params = json.loads(c.params)
        messages = json.loads(c.prompt)
        queue: asyncio.Queue = asyncio.Queue()

        async def side(label: str, model: str, slot: str):
            """One side's answer: `slot` is where it is stored (the model's name, or its
            second sample's where a model is compared with itself, drawn with the next seed)."""
            key = (c.item, slot)
            stored = issued.answers.get(slot)
            running = self._generating.get(key)
            if stored is None and running is not None:  # another annotator's stream of it
                await asyncio.shield(running)  # (always ends with a result, never raises)
                found = await asyncio.to_thread(store_votes.comparison_for, self.store, cid,
                                                caller.name)  # fmt: skip
                stored = found.answers.get(slot)
            if stored is not None and c.gold:  # as if generated: gold is never marked
                words = stored.text.split(" ")
                for k, word in enumerate(words):
                    await queue.put({"side": label, "text": word + (" " if k < len(words) - 1
                                                                    else "")})  # fmt: skip
                    await asyncio.sleep(GOLD_WORD_S)
                await queue.put({"side": label, "done": True,
                                 "finish_reason": stored.finish_reason})  # fmt: skip
                return
            if stored is not None:  # shown as stored: what the vote will keep
                await queue.put({"side": label, "text": stored.text})
                await queue.put({"side": label, "done": True,
                                 "finish_reason": stored.finish_reason})  # fmt: skip
                return
            mine = self._generating[key] = asyncio.get_running_loop().create_future()
            t0, first, final = time.time(), None, None
            try:
                adapter = await asyncio.to_thread(self.resolve, model)
                req = ChatCompletionRequest(
                    model=model, messages=messages, temperature=params["temperature"],
                    top_p=params["top_p"], seed=c.seed + (slot != model),
                )  # fmt: skip
                ids, _ = await asyncio.to_thread(self.chat_prompt, req, adapter)
                payload = self.payload(list(ids), params["max_tokens"], req, adapter)
                pieces = self.handle(adapter, stream=True).generate_stream.remote(payload)
                async for item in pieces:
                    if "text" in item:
                        first = first or (time.time() - t0) * 1000
                        await queue.put({"side": label, "text": item["text"]})
                    else:
                        final = item["final"]
                total = (time.time() - t0) * 1000
                await asyncio.to_thread(
                    store_votes.store_answer, self.store, c.item, slot, final, first, total
                )
                await queue.put({"side": label, "done": True,
                                 "finish_reason": final["finish_reason"]})  # fmt: skip
            except Exception as e:  # the page shows it and offers to try again
                message = e.message if isinstance(e, ApiError) else f"generation failed: {e}"
                await queue.put({"side": label, "error": message})
            finally:
                if not mine.done():
                    mine.set_result(None)
                if self._generating.get(key) is mine:
                    del self._generating[key]

        async def events():
            slot_a, slot_b = answer_slots(c.model_a, c.model_b, c.swapped)
            tasks = [asyncio.ensure_future(side("a", c.model_a, slot_a)),
                     asyncio.ensure_future(side("b", c.model_b, slot_b))]  # fmt: skip
            finished = 0
            try:
                while finished < 2:
                    event = await queue.get()
                    finished += "done" in event or "error" in event
                    yield f"data: {json.dumps(event)}\n\n"
                yield 'data: {"complete": true}\n\n'
            finally:
                for t in tasks:
                    t.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    # ---- votes ----------------------------------------------------------------------------

    @api.post("/arena/api/votes")
    async def vote(self, request: Request):
        caller = await asyncio.to_thread(self.annotator, request, True)
        req = await self.body(request, VoteRequest)
        try:
            issued = await asyncio.to_thread(store_votes.comparison_for, self.store,
                                             req.comparison_id, caller.name)  # fmt: skip
        except store_votes.FeedbackError as e:
            raise _feedback_error(e) from None
        spec = self.campaign(issued.comparison.campaign)
        for field in ("comment", "better_answer"):
            text = getattr(req, field)
            if text is not None and len(text) > spec.max_comment_chars:
                raise ApiError(
                    413,
                    f"{field} of {len(text)} characters is over the campaign's limit of "
                    f"{spec.max_comment_chars}",
                    code="comment_too_long",
                    param=field,
                )
        try:
            stored, replayed = await asyncio.to_thread(
                store_votes.cast_vote, self.store, caller.name, req.vote_id, req.comparison_id,
                req.verdict, (req.comment or "").strip() or None,
                (req.better_answer or "").strip() or None, req.replaces,
                "simulated" if caller.project == SIMULATED_PROJECT else "human", issued,
                spec.reveal,
            )  # fmt: skip
        except store_votes.FeedbackError as e:
            raise _feedback_error(e) from None
        return {
            "vote": {k: stored[k] for k in ("vote_id", "comparison_id", "verdict", "replaces",
                                            "comment", "better_answer", "created_at")},
            "replayed": replayed,
            "counted": not stored["after_reveal"],
            "revealed": ({"a": stored["model_a"], "b": stored["model_b"]} if spec.reveal
                         else None),
            "progress": await asyncio.to_thread(self.campaign_state, spec, caller.name),
        }  # fmt: skip

    # ---- leaderboard ----------------------------------------------------------------------

    def board(self, name: str) -> dict:
        cached = self._boards.get(name)
        if cached is not None and time.monotonic() - cached[0] < LEADERBOARD_TTL_S:
            return cached[1]
        rows, items = store_votes.effective_rows(self.store, name)
        counted = counted_votes(rows, items, self.campaign(name).quality)
        board = leaderboard(counted.votes, self.base_name, LEADERBOARD_RESAMPLES, items=items)
        board["campaign"] = name
        quality = [q.row() for q in counted.annotators.values()]
        board["quality"] = {"left_out": counted.dropped, "annotators": quality}
        self._boards[name] = (time.monotonic(), board)
        return board

    @api.get("/arena/api/campaigns/{name}/leaderboard")
    async def leaderboard_json(self, name: str, request: Request):
        caller = await asyncio.to_thread(self.annotator, request, False, name)
        board = await asyncio.to_thread(self.board, name)
        if "admin" in caller.scopes:
            return board
        # annotators see no other annotator's name, speed or reliability
        shown = {k: v for k, v in board.items() if k not in ADMIN_ONLY}
        if shown.get("agreement"):
            shown["agreement"] = {k: v for k, v in shown["agreement"].items()
                                  if k != "cohen_kappa"}  # fmt: skip
        return shown

    @api.get("/arena/api/campaigns/{name}/{plot}.png")
    async def leaderboard_png(self, name: str, plot: str, request: Request):
        await asyncio.to_thread(self.annotator, request, False, name)
        if plot not in ("leaderboard", "winrate"):
            raise ApiError(404, f"no plot '{plot}'", code="not_found")
        board = await asyncio.to_thread(self.board, name)
        if len(board["ratings"]) < 2:
            raise ApiError(404, "no votes yet: nothing to plot", code="no_votes")
        folder = Path(self.plot_dir) / name
        paths = await asyncio.to_thread(plots, board, folder)
        path = paths[0] if plot == "leaderboard" else paths[1]
        return Response(path.read_bytes(), media_type="image/png",
                        headers={"Cache-Control": "no-store"})  # fmt: skip
