"""The comparison page and its API on a real Serve app: signed in through Debian's Chromium
(Playwright), answers streamed side by side, votes by click and by key, identities revealed,
the leaderboard page; over plain HTTP: cookies and CSRF, every refusal with its status, and
300 votes from 15 clients each sent twice (with the ingress killed mid-load) stored exactly
once on SQLite and on the local PostgreSQL (1000 from 50 in `make test-soak`)."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PG, free_port, short_dir
from sqlalchemy import create_engine, text
from test_serve_engine import write_adapter
from test_serve_gate import publish_adapter
from transformers import AutoTokenizer

from ftservice.config import ModelSpec
from ftservice.models import resolve_model

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def campaigns(prompts: Path, domain: Path) -> list[dict]:
    return [
        {"name": "demo", "prompts": [str(prompts)], "allow_custom_prompts": True,
         "pairs": "uniform", "votes_per_prompt": 20, "quota": 5,
         "generation": {"max_tokens": 160, "temperature": 0.0}},
        {"name": "overlap", "prompts": [str(prompts)], "overlap": 2, "quota": 3,
         "pairs": "adaptive", "generation": {"max_tokens": 24, "temperature": 1.0}},
        {"name": "sim", "prompts": [str(prompts)], "quota": 4, "pairs": "uniform",
         "generation": {"max_tokens": 8, "temperature": 0.0}},
        {"name": "load", "prompts": [str(prompts)], "votes_per_prompt": 400, "quota": None,
         "requests_per_minute": 100000, "generation": {"max_tokens": 2, "temperature": 0.0},
         "max_pending": 20},  # the load test issues 20 typed prompts each before voting
        {"name": "quality", "prompts": [str(domain)], "votes_per_prompt": 50, "quota": None,
         "overlap": 2, "requests_per_minute": 100000,
         "generation": {"max_tokens": 8, "temperature": 0.0},
         "quality": {"gold_share": 0.3, "min_reliability": 0.5}},
        {"name": "self", "prompts": [str(prompts)], "models": ["alpha"], "self_pairs": 1.0,
         "overlap": 2, "votes_per_prompt": 1, "quota": None, "requests_per_minute": 100000,
         "generation": {"max_tokens": 12, "temperature": 1.0}, "quality": {"enabled": False}},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def arena(tmp_path_factory, tiny_llama):
    """One Serve app with two adapters and two campaigns; annotators' keys."""
    import ray
    from ray import serve

    from ftservice.feedback.votes import add_annotator
    from ftservice.serve.app import build_app
    from ftservice.serve.spec import ServeSpec
    from ftservice.store.db import open_store
    from ftservice.store.keys import create_key

    root = tmp_path_factory.mktemp("arena")
    registry = root / "registry"
    base = resolve_model(ModelSpec(name=str(tiny_llama)))
    for name, seed in (("alpha", 1), ("beta", 2)):
        folder = write_adapter(root / name, tiny_llama, seed)
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
        publish_adapter(registry, name, folder, base)
    prompts = root / "prompts.jsonl"
    rows = [
        {"id": f"q{i}", "instruction": f"Tell me about product number {i}."} for i in range(6)
    ] + [{"id": "hostile", "instruction": f"Explain {HOSTILE}"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))  # fmt: skip
    domain = root / "domain.jsonl"  # questions with reference answers: gold comparisons
    domain.write_text("\n".join((REPO / "data/domain/train.jsonl").read_text().splitlines()[:20]))
    url = f"sqlite:///{root / 'state' / 'ftservice.db'}"
    spec_json = {
        "name": "arena", "model": {"name": str(tiny_llama)}, "base_name": "tiny",
        "registries": [str(registry)], "replicas": {"num": 1, "cpus": 0.5},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "limits": {"max_tokens": 256, "max_request_bytes": 16384},
        "store": {"url": url}, "campaigns": campaigns(prompts, domain),
    }  # fmt: skip
    store = open_store(url)
    keys = {"user": create_key(store, "user", ["inference"])}
    for who in ("ann1", "ann2"):
        keys[who] = add_annotator(store, who, "demo")
        add_annotator(store, who, "overlap")
    keys["slow"] = create_key(store, "slow", ["annotator"], requests_per_minute=3)
    add_annotator(store, "slow", "demo")
    keys["outsider"] = create_key(store, "outsider", ["annotator"])  # in no campaign
    keys["holder"] = add_annotator(store, "holder", "demo")
    keys["checker"] = add_annotator(store, "checker", "quality")
    keys["admin"] = create_key(store, "admin", ["admin", "inference"])
    port = free_port()
    ray_tmp = short_dir("ftr-arena-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, _temp_dir=str(ray_tmp), include_dashboard=False,
                 logging_level="warning")  # fmt: skip
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(ServeSpec.model_validate(spec_json)), name="arena",
                      route_prefix="/")  # fmt: skip
            yield {"url": f"http://127.0.0.1:{port}", "keys": keys, "store": store,
                   "root": root, "spec": spec_json, "prompts": prompts}  # fmt: skip
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


class Client:
    """A plain HTTP client with a cookie jar (as a browser keeps the session cookie)."""

    def __init__(self, arena, prefix: str = ""):
        self.base = arena["url"] + prefix
        self.cookies: dict[str, str] = {}
        self.csrf: str | None = None
        self.set_cookie: list[str] = []

    def call(self, method, path, body=None, bearer=None, csrf=True, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
        if self.cookies:
            req.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        if csrf and self.csrf:
            req.add_header("X-CSRF-Token", self.csrf)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, headers, payload = r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            status, headers, payload = e.code, e.headers, e.read()
        for c in headers.get_all("set-cookie") or []:
            self.set_cookie.append(c)
            name, _, value = c.split(";")[0].partition("=")
            self.cookies[name] = value.strip('"')
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, {"not_json": payload.decode(errors="replace")}

    def sign_in(self, token):
        status, me = self.call("POST", "/arena/api/session", {"token": token})
        assert status == 200, me
        self.csrf = me["csrf"]
        return me

    def stream(self, cid) -> list[dict]:
        req = urllib.request.Request(f"{self.base}/arena/api/comparisons/{cid}/stream")
        req.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        with urllib.request.urlopen(req, timeout=120) as r:
            body = r.read().decode()
        return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


def test_the_api_refuses_what_it_must_with_the_right_status(arena):
    ann = Client(arena)
    status, body = ann.call("POST", "/arena/api/session", {"token": "fts-nope"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = ann.call("POST", "/arena/api/session", {"token": arena["keys"]["user"]})
    assert status == 403 and "annotator" in body["error"]["message"]
    assert ann.call("POST", "/arena/api/campaigns/demo/next", {})[0] == 401  # not signed in
    me = ann.sign_in(arena["keys"]["ann1"])
    assert [c["name"] for c in me["campaigns"]] == ["demo", "overlap"]
    [cookie] = [c for c in ann.set_cookie if c.startswith("ftservice_session=")]
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/arena" in flags
    status, body = ann.call("POST", "/arena/api/campaigns/demo/next", {}, csrf=False)
    assert status == 403 and body["error"]["code"] == "csrf_failed"
    status, body = ann.call("POST", "/arena/api/campaigns/load/next", {})
    assert status == 403 and body["error"]["code"] == "not_in_campaign"
    assert ann.call("POST", "/arena/api/campaigns/nope/next", {})[0] == 404
    status, body = ann.call("POST", "/arena/api/campaigns/demo/next", {"nope": 1})
    assert status == 400 and "nope" in body["error"]["message"]
    status, c = ann.call("POST", "/arena/api/campaigns/demo/next", {})
    assert status == 200 and c["progress"] == {
        "name": "demo", "done": 0, "quota": 5, "allow_custom_prompts": True,
        "max_comment_chars": 2000}  # fmt: skip
    vote = {"vote_id": uuid.uuid4().hex, "comparison_id": c["id"], "verdict": "a"}
    status, body = ann.call("POST", "/arena/api/votes", vote)
    assert status == 409 and body["error"]["code"] == "answers_pending"  # not streamed yet
    events = ann.stream(c["id"])
    assert events[-1] == {"complete": True}
    assert {e["side"] for e in events if e.get("done")} == {"a", "b"}
    status, body = ann.call("POST", "/arena/api/votes", vote | {"comment": "x" * 2001})
    assert status == 413 and body["error"]["param"] == "comment"
    status, body = ann.call("POST", "/arena/api/votes", vote | {"comparison_id": "f" * 32})
    assert status == 404
    other = Client(arena)
    other.sign_in(arena["keys"]["ann2"])
    status, body = other.call("POST", "/arena/api/votes", vote)  # ann1's comparison
    assert status == 404 and body["error"]["code"] == "comparison_not_found"
    assert other.call("GET", f"/arena/api/comparisons/{c['id']}/stream")[0] == 404
    status, first = ann.call("POST", "/arena/api/votes", vote)
    assert status == 200 and not first["replayed"]
    assert set(first["revealed"].values()) <= {"tiny", "alpha", "beta"}
    assert first["progress"]["done"] == 1
    status, again = ann.call("POST", "/arena/api/votes", vote | {"verdict": "b"})  # a replay
    assert status == 200 and again["replayed"] and again["vote"]["verdict"] == "a"
    status, body = ann.call("POST", "/arena/api/votes", vote | {"vote_id": uuid.uuid4().hex})
    assert status == 409 and body["error"]["code"] == "already_voted"
    fix = vote | {"vote_id": uuid.uuid4().hex, "verdict": "tie", "replaces": vote["vote_id"]}
    status, body = ann.call("POST", "/arena/api/votes", fix)
    assert status == 200 and body["vote"]["replaces"] == vote["vote_id"]
    assert not body["counted"]  # the models were shown: kept as a note, the first vote counts
    holder = Client(arena)  # typed prompts: at most max_pending (2) held without a vote
    holder.sign_in(arena["keys"]["holder"])
    typed = [holder.call("POST", "/arena/api/campaigns/demo/next", {"prompt": f"Say {k}."})
             for k in range(3)]  # fmt: skip
    assert [status for status, _ in typed] == [200, 200, 429]
    error = typed[2][1]["error"]
    assert error["code"] == "too_many_pending" and "vote on them" in error["message"]
    slow = Client(arena)
    slow.sign_in(arena["keys"]["slow"])
    codes = [slow.call("POST", "/arena/api/campaigns/demo/next", {})[0] for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[-1] == 429  # sign-in counted none; 3 a minute
    outsider = Client(arena)
    assert outsider.sign_in(arena["keys"]["outsider"])["campaigns"] == []
    status, _ = ann.call("DELETE", "/arena/api/session")
    assert status == 204
    assert ann.call("GET", "/arena/api/session")[0] == 401  # the session is gone server-side


def test_a_model_against_itself_streams_two_samples_and_its_votes_export_its_own_pair(arena):
    """A self-pair campaign through the page's routes: both sides are one adapter's answers
    drawn with two seeds and stored apart; the item's second annotator is shown the same two
    answers (each on a side of its own coin); votes for the same answer agree whichever side
    it was on; the export pairs the adapter's two samples; the leaderboard rates nothing."""
    from ftservice.feedback import votes as store_votes
    from ftservice.feedback.campaign import answer_slots
    from ftservice.feedback.export import export_rows

    store = arena["store"]
    clients = {}
    for who in ("self1", "self2"):
        clients[who] = Client(arena)
        clients[who].sign_in(store_votes.add_annotator(store, who, "self"))
    chosen = {}  # (which sample goes left is a coin: tests/test_feedback.py sees both sides)
    for _ in range(3):
        for who, client in clients.items():
            status, comparison = client.call("POST", "/arena/api/campaigns/self/next", {})
            assert status == 200, comparison
            events = client.stream(comparison["id"])
            text = {side: "".join(e.get("text", "") for e in events if e.get("side") == side)
                    for side in "ab"}  # fmt: skip
            assert text["a"] != text["b"], text  # two samples, not one answer twice
            issued = store_votes.comparison_for(store, comparison["id"], who)
            c = issued.comparison
            assert c.model_a == c.model_b == "alpha"
            slots = answer_slots(c.model_a, c.model_b, c.swapped)
            assert {s: issued.answers[s].text for s in slots} == dict(
                zip(slots, text.values(), strict=True)
            )
            verdict = "a" if slots[0] == "alpha" else "b"  # the first sample, wherever it is
            vote = {"vote_id": uuid.uuid4().hex, "comparison_id": c.id, "verdict": verdict}
            status, body = client.call("POST", "/arena/api/votes", vote)
            assert status == 200 and body["revealed"] == {"a": "alpha", "b": "alpha"}
            chosen.setdefault(c.item, set()).add(issued.answers["alpha"].text)
    assert len(chosen) == 3 and all(len(t) == 1 for t in chosen.values())  # overlap 2, shared
    rows, items = store_votes.effective_rows(store, "self")
    pairs, lineage, counts = export_rows(rows, items, "trl")
    assert counts["pairs"] == 3 and "dropped_conflict" not in counts  # they agreed: 3 pairs
    for row, line in zip(pairs, lineage, strict=True):
        assert (line["chosen_model"], line["rejected_model"]) == ("alpha", "alpha#2")
        assert {row["chosen"][0]["content"]} == chosen[line["item"]]
    status, board = Client(arena).call(
        "GET", "/arena/api/campaigns/self/leaderboard", bearer=arena["keys"]["admin"]
    )
    assert status == 200 and board["ratings"] == [] and board["votes"] == 6


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright's Python API (one for the module)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the page's tests need Debian's Chromium. Install it with "
            "'apt-get install -y chromium' (scripts/install.sh does where it may); never "
            "'playwright install'."
        )
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            yield b
        finally:
            b.close()


def signed_in_page(browser, arena, who: str, width: int = 1280, height: int = 900):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{arena['url']}/arena")
    page.locator("#token").fill("fts-wrong")
    page.locator("#sign-in button").click()
    page.locator("#sign-in-error").filter(has_text="unknown or revoked key").wait_for()
    page.locator("#token").fill(arena["keys"][who])
    page.keyboard.press("Enter")
    page.locator("#arena").wait_for()
    return context, page, errors


def watch_stream(page) -> list[int]:
    """Lengths of answer A read while both answers stream, until the votes are enabled."""
    seen = []
    deadline = time.time() + 120
    while time.time() < deadline:
        seen.append(len(page.locator("#text-a").text_content() or ""))
        if page.locator("#votes button[data-verdict='a']").is_enabled():
            break
        time.sleep(0.02)
    return seen


def stored_vote(arena, vote_model_a: str) -> dict:
    with arena["store"]() as session:
        row = session.execute(
            text("SELECT * FROM votes WHERE annotator = 'ann2' ORDER BY id DESC LIMIT 1")
        ).mappings().one()  # fmt: skip
    return dict(row)


def distinct_colours(png: bytes) -> int:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(set(image.getdata()))


def test_the_page_signs_in_streams_both_answers_and_takes_votes_by_click_and_key(browser, arena):
    context, page, errors = signed_in_page(browser, arena, "ann2")
    try:
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["ftservice_session"]["httpOnly"]
        assert cookies["ftservice_session"]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # scripts cannot read the session
        page.locator("#prompt").filter(has_text="Tell me about").or_(
            page.locator("#prompt").filter(has_text="Explain")).wait_for()  # fmt: skip
        lengths = watch_stream(page)
        streamed = sorted({n for n in lengths if n > 0})
        assert len(streamed) >= 2, f"answer A never grew between two reads: {lengths[-20:]}"
        assert page.locator("#text-b").text_content()
        assert page.locator("#model-a").text_content() == ""  # blind until the vote
        page.locator("#extra summary").click()
        page.locator("#comment").fill("A reads better.")
        page.locator("#votes button[data-verdict='a']").click()
        page.locator("#model-a").filter(has_text="").wait_for()
        page.locator("#next").wait_for()
        revealed = (
            page.locator("#model-a").text_content(),
            page.locator("#model-b").text_content(),
        )
        assert set(revealed) <= {"tiny", "alpha", "beta"} and revealed[0] != revealed[1]
        assert page.locator("#progress-text").text_content() == "1 / 5 done"
        row = stored_vote(arena, revealed[0])
        assert (row["model_a"], row["model_b"], row["verdict"]) == (*revealed, "a")
        assert row["comment"] == "A reads better." and row["response_a"]
        with arena["store"]() as session:
            swapped = session.execute(text("SELECT swapped FROM comparisons WHERE id = :i"),
                                      {"i": row["comparison_id"]}).scalar()  # fmt: skip
        assert swapped == (row["model_a"] != min(revealed))  # the coin is recorded
        shot = page.screenshot(path=str(arena["root"] / "arena.png"), full_page=True)
        assert distinct_colours(shot) > 50
        assert page.locator("#pane-a").is_visible() and page.locator("#pane-b").is_visible()
        # the keyboard alone: Enter for the next comparison, 2 for "B is better"
        first_id = row["comparison_id"]
        page.locator("body").press("Enter")
        page.locator("#progress-text").wait_for()
        watch_stream(page)
        page.keyboard.press("2")
        page.locator("#next").wait_for()
        assert page.locator("#progress-text").text_content() == "2 / 5 done"
        second = stored_vote(arena, "")
        assert second["verdict"] == "b" and second["comparison_id"] != first_id
        assert page.locator("#model-b").text_content() == second["model_b"]
        assert errors == []
    finally:
        context.close()


def test_html_in_prompts_answers_and_comments_is_shown_as_text(browser, arena):
    context, page, errors = signed_in_page(browser, arena, "ann1", width=390, height=844)
    try:
        page.locator("#custom-prompt").wait_for()
        page.locator("#custom-prompt").fill(f"What is {HOSTILE}?")
        page.locator("#custom button").click()
        shown = page.locator("#prompt").filter(has_text="<script>window.__xss = 1</script>")
        try:
            shown.wait_for(timeout=60_000)
        except Exception:
            raise AssertionError(f"status: {page.locator('#status').text_content()}") from None
        watch_stream(page)
        assert page.evaluate("window.__xss") is None
        assert page.locator("#prompt img, #prompt script").count() == 0
        page.locator("#extra summary").click()
        page.locator("#better").fill(f"Better: {HOSTILE}")
        page.locator("#votes button[data-verdict='tie']").click()
        page.locator("#next").wait_for()
        with arena["store"]() as session:
            better = session.execute(text(
                "SELECT better_answer FROM votes WHERE annotator = 'ann1' ORDER BY id DESC"
            )).scalars().first()  # fmt: skip
        assert better == f"Better: {HOSTILE}"  # stored as sent, never run
        # a narrow screen: the answers stack, both on the page
        a, b = page.locator("#pane-a").bounding_box(), page.locator("#pane-b").bounding_box()
        assert b["y"] > a["y"] + a["height"] - 1 and a["width"] <= 390
        assert page.evaluate("window.__xss") is None and errors == []
    finally:
        context.close()


def test_the_leaderboard_page_shows_ratings_and_plots_to_signed_in_annotators(browser, arena):
    context, page, errors = signed_in_page(browser, arena, "ann2")
    try:
        page.goto(f"{arena['url']}/arena/leaderboard?campaign=demo")
        page.locator("#ratings tbody tr").first.wait_for()
        assert page.locator("#ratings tbody tr").count() >= 2
        widths = []
        for _ in range(300):  # (the page's CSP refuses wait_for_function's string eval)
            widths = [page.locator(f"#plot-{p}").evaluate("img => img.naturalWidth")
                      for p in ("ratings", "winrate")]  # fmt: skip
            if all(widths):
                break
            time.sleep(0.1)
        assert all(widths), "the plots did not load"
        shot = page.screenshot(path=str(arena["root"] / "leaderboard.png"), full_page=True)
        assert distinct_colours(shot) > 50 and errors == []
    finally:
        context.close()
    anonymous = browser.new_context()
    try:
        page = anonymous.new_page()
        page.goto(f"{arena['url']}/arena/leaderboard")
        page.locator("#status").filter(has_text="Sign in").wait_for()
        assert page.locator("#ratings tbody tr").count() == 0
    finally:
        anonymous.close()


def prepared_comparisons(
    store, annotators: int, each: int, prefix: str
) -> dict[str, tuple[str, list]]:
    """Annotators of the load campaign with comparisons issued and answered, made straight
    in the store (what is under test here is the votes): {name: (key, comparison ids)}."""
    from ftservice.feedback import votes

    spec = votes.campaign_spec(store, "load")
    rng = random.Random(0)
    out = {}
    for k in range(annotators):
        name = f"{prefix}-{k}"
        secret = votes.add_annotator(store, name, "load")
        ids = []
        for j in range(each):
            issued = votes.issue(store, spec, name, ["tiny", "alpha", "beta"], {}, [], rng,
                                 custom=[{"role": "user", "content": f"{name} {j}"}])  # fmt: skip
            c = issued.comparison
            for model in (c.model_a, c.model_b):
                out_ = {"text": f"{model} {j}", "finish_reason": "stop", "completion_tokens": 2}
                votes.store_answer(store, c.item, model, out_, 1.0, 2.0)
            ids.append(c.id)
        out[name] = (secret, ids)
    return out


def vote_storm(arena, prefix: str, prepared: dict, app: str, kill_after: int) -> dict[str, list]:
    """Every vote sent twice from 50 client threads (the same vote id), the ingress killed
    once `kill_after` are acknowledged; a client sends again after an error, as the page
    does. {vote id: the `replayed` flag of each acknowledgement}."""
    import ray

    attempts = [(key, cid, f"{cid}-vote") for key, ids in prepared.values() for cid in ids] * 2
    random.Random(1).shuffle(attempts)
    acked: dict[str, list] = {}
    failures: list[object] = []  # what clients met while the ingress was down
    lock = threading.Lock()
    killed = threading.Event()
    verdicts = ["a", "b", "tie", "both_bad"]

    def send(attempt):
        key, cid, vote_id = attempt
        client = Client(arena, prefix)
        body = {"vote_id": vote_id, "comparison_id": cid, "verdict": verdicts[len(cid) % 4]}
        deadline = time.time() + 180
        while True:
            try:
                status, out = client.call("POST", "/arena/api/votes", body, bearer=key)
            except (OSError, http.client.HTTPException):  # the connection dropped with the ingress
                status, out = None, None
            if status == 200:
                with lock:
                    acked.setdefault(vote_id, []).append(out["replayed"])
                return
            assert status is None or status >= 500, (status, out)
            failures.append(status)
            assert time.time() < deadline, f"no answer for {vote_id}: {status} {out}"
            time.sleep(0.3)

    def killer():
        while len(acked) < kill_after:
            time.sleep(0.05)
        [victim] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if f"{app}#ingress#" in a["name"]]  # fmt: skip
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed.set()

    k = threading.Thread(target=killer, daemon=True)
    k.start()
    with ThreadPoolExecutor(50) as pool:
        list(pool.map(send, attempts))
    assert killed.is_set(), "the ingress was never killed"
    assert failures, "no client met the ingress's death: the kill proved nothing"
    return acked


def count_votes(store, prepared: dict) -> tuple[int, set[str]]:
    """Votes stored on the prepared comparisons: (rows, vote ids)."""
    comparisons = {cid for _, ids in prepared.values() for cid in ids}
    with store() as session:
        rows = session.execute(
            text("SELECT vote_id, comparison_id FROM votes WHERE campaign = 'load'")
        ).all()
    mine = [vote_id for vote_id, cid in rows if cid in comparisons]
    return len(mine), set(mine)


def assert_stored_once(acked: dict[str, list], ids: set[str], votes: int) -> None:
    """Each vote acknowledged for both its sends, stored once: at most one acknowledgement
    says it was new (none where the kill lost the first answer: the retry finds it stored),
    and all but the requests in flight at the kill (50 clients) got one."""
    assert len(acked) == votes and set(acked) <= ids and len(ids) == votes
    assert all(len(flags) == 2 for flags in acked.values()), "a send was never acknowledged"
    first = [flags.count(False) for flags in acked.values()]
    assert max(first) <= 1, "a vote was acknowledged as new twice: it was stored twice"
    assert sum(first) >= votes - 50, f"only {sum(first)} of {votes} votes acknowledged as new"


STORMS = [
    pytest.param(15, 100, id="300-votes"),
    pytest.param(50, 300, id="1000-votes", marks=pytest.mark.soak),
]


@pytest.mark.parametrize(("annotators", "kill_after"), STORMS)
def test_votes_sent_twice_with_the_ingress_killed_are_stored_once_on_sqlite(
    arena, annotators, kill_after
):
    prepared = prepared_comparisons(arena["store"], annotators, 20, f"sq{annotators}")
    acked = vote_storm(arena, "", prepared, "arena", kill_after)
    rows, ids = count_votes(arena["store"], prepared)
    assert rows == annotators * 20
    assert_stored_once(acked, ids, annotators * 20)


@pytest.mark.pg
@pytest.mark.parametrize(("annotators", "kill_after"), STORMS)
def test_votes_sent_twice_with_the_ingress_killed_are_stored_once_on_postgresql(
    arena, annotators, kill_after
):
    from ray import serve

    from ftservice.serve.app import build_app
    from ftservice.serve.spec import ServeSpec
    from ftservice.store.db import open_store

    schema = f"ftservice_arena_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{PG}?options=-csearch_path%3D{schema}"
    try:
        store = open_store(url)
        spec = dict(arena["spec"], name="arena-pg", store={"url": url},
                    replicas={"num": 1, "cpus": 0.3})  # fmt: skip
        serve.run(build_app(ServeSpec.model_validate(spec)), name="arena-pg", route_prefix="/pg")
        prepared = prepared_comparisons(store, annotators, 20, "pg")
        acked = vote_storm(arena, "/pg", prepared, "arena-pg", kill_after)
        rows, ids = count_votes(store, prepared)
        assert rows == annotators * 20
        assert_stored_once(acked, ids, annotators * 20)
        with admin.connect() as c:  # the tables really are in the test's own schema
            n = c.execute(text(f"SELECT count(*) FROM {schema}.votes")).scalar()
        assert n == annotators * 20
    finally:
        serve.delete("arena-pg")
        with admin.connect() as c:
            c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def test_annotators_of_one_comparison_see_the_same_sampled_answers_their_votes_keep(arena):
    """Overlap 2 with sampling: two annotators get the same item and stream it at the same
    time; the answer is generated once, and each vote keeps exactly the text its annotator
    was shown. Pairs are chosen adaptively from the votes so far."""
    first, second = Client(arena), Client(arena)
    first.sign_in(arena["keys"]["ann1"])
    second.sign_in(arena["keys"]["ann2"])
    for round_ in range(3):
        c1 = first.call("POST", "/arena/api/campaigns/overlap/next", {})[1]
        c2 = second.call("POST", "/arena/api/campaigns/overlap/next", {})[1]
        with arena["store"]() as session:
            items = session.execute(
                text("SELECT item, model_a, model_b FROM comparisons WHERE id IN (:a, :b)"),
                {"a": c1["id"], "b": c2["id"]},
            )
            items = items.all()  # fmt: skip
        assert len({i.item for i in items}) == 1, "overlap 2: both annotators get the item"
        with ThreadPoolExecutor(2) as pool:
            seen = list(pool.map(lambda x: x[0].stream(x[1]["id"]), [(first, c1), (second, c2)]))
        for client, c, events in ((first, c1, seen[0]), (second, c2, seen[1])):
            shown = {side: "".join(e.get("text", "") for e in events if e.get("side") == side)
                     for side in "ab"}  # fmt: skip
            vote = {"vote_id": uuid.uuid4().hex, "comparison_id": c["id"], "verdict": "a"}
            status, out = client.call("POST", "/arena/api/votes", vote)
            assert status == 200, out
            query = text("SELECT response_a, response_b FROM votes WHERE vote_id = :v")
            with arena["store"]() as session:
                row = session.execute(query, {"v": vote["vote_id"]}).one()
            assert (row.response_a, row.response_b) == (shown["a"], shown["b"]), round_
            assert shown["a"] and shown["b"]


def test_simulated_annotators_vote_through_the_page_routes_by_the_rule(arena, cli_env):
    """`ftservice feedback simulate`: three annotator keys vote over HTTP (the length-rule
    profile without flips: every verdict is the shipped rule's on the answers stored); their
    votes are labelled simulated, their keys revoked after, and the leaderboard can leave them
    out."""
    from ftservice.data.preference_rule import prefers

    url = arena["spec"]["store"]["url"]
    done = subprocess.run(
        [sys.executable, "-m", "ftservice", "feedback", "simulate", "sim", "--url", arena["url"],
         "--annotators", "3", "--votes", "7", "--profile", "length_rule", "--accuracy", "1",
         "--read-seconds", "0", "--store", url],
        capture_output=True, text=True, env=cli_env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "7 votes by 3 simulated annotators" in done.stdout
    with arena["store"]() as session:
        rows = session.execute(text(
            "SELECT annotator, verdict, source, response_a, response_b FROM votes "
            "WHERE campaign = 'sim'")).all()  # fmt: skip
        revoked = session.execute(text(
            "SELECT count(*) FROM api_keys WHERE name LIKE 'sim-sim-%' "
            "AND revoked_at IS NOT NULL")).scalar()  # fmt: skip
    assert len(rows) == 7 and {r.source for r in rows} == {"simulated"}
    assert len({r.annotator for r in rows}) == 3 and revoked == 3
    assert all(r.verdict == "ab"[prefers(r.response_a, r.response_b)] for r in rows)
    humans = subprocess.run(
        [sys.executable, "-m", "ftservice", "feedback", "leaderboard", "sim", "--json",
         "--source", "human", "--resamples", "10", "--store", url],
        capture_output=True, text=True, env=cli_env, cwd=arena["root"],
    )  # fmt: skip
    assert humans.returncode == 0 and json.loads(humans.stdout)["votes"] == 0, humans.stderr


def test_gold_comparisons_look_like_any_other_on_the_page(arena):
    """The same fields from /next, the same events streamed a piece at a time; only the
    store knows which comparisons are gold."""
    client = Client(arena)
    client.sign_in(arena["keys"]["checker"])
    seen = {True: [], False: []}
    for _ in range(40):
        status, c = client.call("POST", "/arena/api/campaigns/quality/next", {})
        assert status == 200, c
        events = client.stream(c["id"])
        with arena["store"]() as session:
            gold = session.execute(text("SELECT gold FROM comparisons WHERE id = :c"),
                                   {"c": c["id"]}).scalar()  # fmt: skip
        seen[gold is not None].append((c, events))
        vote = {"vote_id": uuid.uuid4().hex, "comparison_id": c["id"], "verdict": "a"}
        assert client.call("POST", "/arena/api/votes", vote)[0] == 200
        if len(seen[True]) >= 2 and len(seen[False]) >= 2:
            break
    assert len(seen[True]) >= 2 and len(seen[False]) >= 2, "no gold among 40 (share 0.3)"
    fields = {kind: {tuple(sorted(c)) for c, _ in pairs} for kind, pairs in seen.items()}
    assert fields[True] == fields[False]
    shapes = {kind: {tuple(sorted(e)) for _, events in pairs for e in events}
              for kind, pairs in seen.items()}  # fmt: skip
    assert shapes[True] == {("side", "text"), ("done", "finish_reason", "side"), ("complete",)}
    assert shapes[True] <= shapes[False] | {("side", "text")}
    for _, events in seen[True]:  # streamed a word at a time, as generated answers are
        assert sum(1 for e in events if e.get("side") == "a" and "text" in e) > 1


def test_a_spammer_counts_with_quality_control_off_and_not_with_it_on(arena):
    """Three annotators who know the answers and one who votes at random, through the page's
    routes; with quality control on the spammer's votes leave the export and the leaderboard
    (exact counts), off they stay; per-annotator quality is shown to admins only."""
    from ftservice.feedback import votes as store_votes
    from ftservice.feedback.campaign import QualitySpec
    from ftservice.feedback.export import export_rows
    from ftservice.feedback.quality import counted_votes
    from ftservice.feedback.simulate import (
        SIMULATED_PROJECT,
        SimulateSpec,
        question_key,
        references_of,
        simulate,
    )

    store = arena["store"]
    spec = store_votes.campaign_spec(store, "quality")
    references = references_of(spec)
    assert len(references) == 20
    sim = SimulateSpec(annotators=4, accuracy=1.0, position_bias=0.0, read_seconds=0.1,
                       spammers=0.25, seed=7)  # fmt: skip
    names = [f"q-sim-{k}" for k in range(4)]  # the spammer is the last
    keys = [store_votes.add_annotator(store, n, "quality", project=SIMULATED_PROJECT)
            for n in names]  # fmt: skip
    report = simulate(arena["url"], "quality", keys, 60, sim, references)
    assert report.votes == 60 and report.spam_votes > 0
    rows, items = store_votes.effective_rows(store, "quality")
    rows = [v for v in rows if v["annotator"] in names]
    models = [v for v in rows if v["gold"] is None]
    spam = [v for v in models if v["annotator"] == names[-1]]
    assert spam and len(rows) == 60
    # the tiny model's answers are all wrong: careful annotators say both bad, and write the
    # right answer in half the time (the profile's default); a spammer never writes
    edits = [v for v in models if v["better_answer"]]
    assert len(edits) == report.written_answers > 0
    for v in edits:
        assert v["annotator"] != names[-1] and v["verdict"] == "both_bad"
        question = json.loads(v["prompt"]) if isinstance(v["prompt"], str) else v["prompt"]
        assert v["better_answer"] == references[question_key(question)].output
    on = counted_votes(rows, items, spec.quality)
    assert not on.annotators[names[-1]].counts
    assert all(on.annotators[n].counts for n in names[:-1])
    assert len(on.votes) == len(models) - len(spam) and on.dropped["unreliable_votes"] == len(spam)
    off = counted_votes(rows, items, QualitySpec(enabled=False))
    assert len(off.votes) == len(models)
    lineage_on = export_rows(on.votes, items, "trl")[1]
    assert not any(names[-1] in row["annotators"] for row in lineage_on)
    # off, every spam vote goes into the export's input; whether it makes a row depends on
    # the other votes on its item (a conflict drops the item), so no row count is asserted
    assert {v["vote_id"] for v in spam} <= {v["vote_id"] for v in off.votes}

    # admins see each annotator's quality; annotators see no other annotator
    status, board = Client(arena).call(
        "GET", "/arena/api/campaigns/quality/leaderboard", bearer=arena["keys"]["admin"]
    )
    assert status == 200 and {q["annotator"] for q in board["quality"]["annotators"]} >= set(names)
    assert board["quality"]["left_out"]["unreliable_annotators"] >= 1
    status, mine = Client(arena).call(
        "GET", "/arena/api/campaigns/quality/leaderboard", bearer=arena["keys"]["checker"]
    )
    assert status == 200 and "quality" not in mine and "annotators" not in mine
    assert "q-sim-0" not in json.dumps(mine)
