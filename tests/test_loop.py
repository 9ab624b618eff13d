"""The closed loop on a tiny model, with real parts: a Ray head, the Serve app on it, simulated
annotators voting over HTTP, DPO on Ray Train beside the app, the store on SQLite. The loop is
killed mid-round and resumed: vote counts stay exact, the round's DPO is trained once, the
lineage is right, and the closing round records one decision with its evidence."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import RayHead, _kill_session, free_port
from test_serve_engine import write_adapter
from test_serve_gate import publish_adapter
from transformers import AutoTokenizer

from ftservice.config import ModelSpec
from ftservice.models import resolve_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_mute_adapter(folder: Path, base: Path, rank: int = 16, token: int | None = None) -> Path:
    """A plain LoRA adapter (written weights) whose every answer is empty: in the last layer's
    MLP, gate and up give unit pairs ±a·x_k for `rank` input dims, so each pair's SiLU(g)·u is
    a²·x_k² whatever the sign; down writes their sum (always large, always positive) into the
    residual's dim 0; the lm_head's LoRA reads dim 0 and puts it on the EOS logit. `token`:
    another token instead, which the adapter then says at every step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    last = model.config.num_hidden_layers - 1
    eos = model.config.eos_token_id if token is None else token
    model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights=False,
        target_modules=["gate_proj", "up_proj", "down_proj", "lm_head"],
    ))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()
        mlp = model.base_model.model.model.layers[last].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            a, b = proj.lora_A["default"].weight, proj.lora_B["default"].weight
            for i in range(rank):
                a[i, i] = 1.0
                b[2 * i, i], b[2 * i + 1, i] = 10.0, -10.0
        mlp.down_proj.lora_A["default"].weight[0, : 2 * rank] = 1.0
        mlp.down_proj.lora_B["default"].weight[0, 0] = 1.0
        head = model.base_model.model.lm_head
        head.lora_A["default"].weight[0, 0] = 1.0
        head.lora_B["default"].weight[eos, 0] = 50.0
    model.save_pretrained(folder, save_embedding_layers=False)  # LoRA tensors only
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("loop")
    registry = root / "registry"
    base = resolve_model(ModelSpec(name=str(tiny_llama)))
    for name, seed in (("alpha", 11), ("beta", 12)):
        folder = write_adapter(root / name, tiny_llama, seed)
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
        publish_adapter(registry, name, folder, base)
    prompts = write_jsonl(
        root / "prompts.jsonl",
        [
            {
                "id": f"q{i}",
                "instruction": f"What does product {i} weigh?",
                "output": f"Product {i} weighs {i + 3} grams.",
                "answer": f"{i + 3} grams",
            }
            for i in range(12)
        ],
    )
    held_out = write_jsonl(
        root / "held_out.jsonl",
        [{"id": f"h{i}", "instruction": f"Which colour is model {i}?"} for i in range(4)],
    )
    domain = write_jsonl(
        root / "domain.jsonl",
        [
            {
                "id": f"d{i}",
                "instruction": f"How heavy is item {i}?",
                "output": f"Item {i} weighs {i} grams.",
                "answer": f"{i} grams",
            }
            for i in range(3)
        ],
    )
    port = free_port()
    store_url = f"sqlite:///{root / 'state' / 'ftservice.db'}"
    serve_spec = {
        "name": "looptest",
        "model": {"name": str(tiny_llama)},
        "base_name": "tiny",
        "registries": [str(registry)],
        "replicas": {"num": 1, "cpus": 0.5},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
        "store": {"url": store_url},
        "port": port,
    }
    (root / "serve.yaml").write_text(json.dumps(serve_spec))
    dpo = {
        "name": "template", "stage": "dpo", "method": "lora",
        "model": {"name": str(tiny_llama)},
        "data": {"train": [str(prompts)], "max_seq_length": 64},
        "dpo": {"parent": str(registry / "alpha"), "beta": 0.1},
        "train": {"learning_rate": 1e-3, "epochs": 1, "micro_batch_size": 4},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": 2},
        "eval": {"domain": str(domain), "general": None, "max_new_tokens": 4},
        "output": {"registry": str(registry), "storage_path": str(root / "runs"),
                   "keep_checkpoints": False},
    }  # fmt: skip
    (root / "dpo.yaml").write_text(json.dumps(dpo))
    loop = {
        "name": "tl", "serve": str(root / "serve.yaml"), "dpo": str(root / "dpo.yaml"),
        "campaign": {"name": "tl-votes", "prompts": [str(prompts)], "votes_per_prompt": 10,
                     "quota": None, "requests_per_minute": 100000,
                     "generation": {"max_tokens": 8, "temperature": 1.0},
                     "quality": {"gold_share": 0.3, "min_reliability": 0.0}},
        "candidates": ["alpha", "beta"], "votes_per_round": 16, "rounds": 1,
        "closing_votes": 12,
        "promotion": {"min_votes": 6, "canary_share": 0.5, "focus_share": 1.0,
                      "max_domain_drop": 1.0},
        "held_out": [str(held_out)], "judge": "answer_key",
        "simulate": {"annotators": 3, "profile": "length_rule", "read_seconds": 0.1},
        "output_dir": str(root / "loops"),
    }  # fmt: skip
    (root / "loop.yaml").write_text(json.dumps(loop))
    head = RayHead(root / "ray")
    left = ["not stopped"]
    try:
        head.wait_ready()
        env = {**head.env, "RAY_ADDRESS": head.gcs_address, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
        yield {"root": root, "registry": registry, "env": env, "store": store_url,
               "url": f"http://127.0.0.1:{port}", "spec": root / "loop.yaml", "head": head,
               "held_out": held_out, "prompts": prompts}  # fmt: skip
    finally:
        left = head.stop()
    assert left == [], f"the ray head left processes behind: {left}"


def ftservice(setup, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ftservice", *args], env=setup["env"], cwd=setup["root"],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_two_rounds_killed_mid_round_and_resumed_count_every_vote_once(setup):
    from sqlalchemy import select

    from ftservice.artifacts import list_artifacts, load_artifact
    from ftservice.feedback import votes as store_votes
    from ftservice.feedback.rounds import alias_history, round_vote_count, round_votes
    from ftservice.loop.spec import PromotionSpec, decide, head_to_head
    from ftservice.store.db import open_store
    from ftservice.store.models import LoopRound, Vote

    loop_spec = json.loads(setup["spec"].read_text())

    cmd = [
        sys.executable,
        "-m",
        "ftservice",
        "loop",
        "run",
        str(setup["spec"]),
        "--no-keep-serving",
    ]
    first = subprocess.Popen(
        cmd, env=setup["env"], cwd=setup["root"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    store = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:  # kill it once round 1 has some of its votes
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            if (setup["root"] / "state" / "ftservice.db").exists():
                store = store or open_store(setup["store"])
                with store() as session:
                    opened = session.get(LoopRound, ("tl", 1)) is not None
                if opened and round_vote_count(store, "tl-votes", 1) >= 5:
                    break
            time.sleep(0.3)
        else:
            pytest.fail("round 1 never got 5 votes")
    finally:
        _kill_session(first.pid)
        first.wait(timeout=30)
    before = round_vote_count(store, "tl-votes", 1)
    assert 5 <= before < 16

    # a loop that exists is not started again by accident
    again = ftservice(setup, "loop", "run", str(setup["spec"]), "--no-keep-serving")
    assert again.returncode != 0 and "--resume" in again.stderr

    resumed = ftservice(setup, "loop", "run", str(setup["spec"]), "--resume", "--no-keep-serving",
                        "--json")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    report = json.loads(resumed.stdout[resumed.stdout.index("{\n") :])

    # exact vote counts: the quota of each round, every vote in exactly one round
    assert round_vote_count(store, "tl-votes", 1) == 16
    assert round_vote_count(store, "tl-votes", 2) == 12
    with store() as session:
        rows = {
            r.round: r for r in session.scalars(select(LoopRound).where(LoopRound.loop == "tl"))
        }
        all_votes = session.scalars(select(Vote).where(Vote.campaign == "tl-votes")).all()
    assert [rows[1].votes, rows[2].votes] == [16, 12]
    gold = [v for v in all_votes if v.gold is not None]
    assert gold, "no gold comparison at a share of 0.3"  # beside the rounds' quotas, not in them
    assert len(all_votes) - len(gold) == 28  # none outside a round, none counted twice
    assert [r["votes"] for r in report["rounds"]] == [16, 12]

    # round 1 trained exactly one adapter, from its leader, with the round's lineage
    dpo = [a for a in list_artifacts(setup["registry"]) if a.meta.spec["stage"] == "dpo"]
    assert [a.name for a in dpo] == ["tl-r1"]
    leader = rows[1].leader
    assert leader in ("alpha", "beta") and rows[1].challenger == "tl-r1"
    art = load_artifact("tl-r1", setup["registry"])
    assert art.meta.parent == leader
    fb = art.meta.feedback
    assert (fb.loop, fb.campaign, fb.round, fb.votes) == ("tl", "tl-votes", 1, 16)
    pairs = setup["root"] / "loops" / "tl" / "round-1" / "pairs.jsonl"
    assert fb.pairs_fingerprint == hashlib.sha256(pairs.read_bytes()).hexdigest()
    assert fb.pairs == len(pairs.read_text().splitlines()) > 0
    ids = (Path(art.location) / fb.vote_ids).read_text().split()
    # the votes of the pairs: the round's, without its gold comparisons (nobody left out)
    made = [v.vote_id for v in round_votes(store, "tl-votes", 1) if v.gold is None]
    assert sorted(ids) == sorted(made) and len(made) == 16

    # one decision, recorded with its evidence, after the alias was made and the canary set
    events = alias_history(store, "looptest")
    assert [e["action"] for e in events][:2] == ["create", "canary"]
    assert events[0]["target"] == leader and events[1]["canary"] == "tl-r1"
    decisions = [e for e in events if e["action"] not in ("create", "canary")]
    assert len(decisions) == 1
    d = decisions[0]
    assert d["subject"] == "tl-r1" and d["round"] == 2
    h2h = d["evidence"]["head_to_head"]
    # focus_share 1.0: every closing vote is tl-r1 vs its parent (same texts counted apart)
    assert h2h["votes"] + h2h["same_answer"] == 12
    # the evidence is the closing round's stored votes, counted again here from the store, and
    # the action is what the promotion rule gives on that evidence
    everything, _ = store_votes.effective_rows(store, "tl-votes")
    closing = {v.vote_id for v in round_votes(store, "tl-votes", 2) if v.gold is None}
    mine = [v for v in everything if v["vote_id"] in closing]
    assert len(mine) == 12
    assert head_to_head(mine, "tl-r1", leader, 0.95) == h2h
    promo = PromotionSpec.model_validate(loop_spec["promotion"])
    assert decide(h2h, d["evidence"]["held_out"], promo) == (d["action"], d["evidence"]["reasons"])
    assert d["target"] == ("tl-r1" if d["action"] == "promote" else leader)
    assert d["evidence"]["held_out"]["prompts"] == 4
    assert "domain" in d["evidence"]["held_out"]

    # the alias answers on the API; the history and the lineage show what happened
    key = _admin_key(store)
    models = _get(setup["url"] + "/v1/models", key)["data"]
    alias = next(m for m in models if m["id"] == "production")
    assert alias["alias"]["target"] == d["target"]
    body = json.dumps({"model": "production", "max_tokens": 3,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
    req = urllib.request.Request(setup["url"] + "/v1/chat/completions", data=body,
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
    history = ftservice(setup, "feedback", "history", "--store", setup["store"])
    assert history.returncode == 0, history.stderr
    assert d["action"] in history.stdout and "tl/2" in history.stdout
    lineage = ftservice(setup, "artifacts", "lineage", "tl-r1", "--registry",
                        str(setup["registry"]))  # fmt: skip
    assert lineage.returncode == 0, lineage.stderr
    assert f"└─ {leader}" in lineage.stdout and "loop tl round 1: " in lineage.stdout
    assert "rating" in lineage.stdout
    out = setup["root"] / "loops" / "tl"
    assert (out / "rounds.png").stat().st_size > 5000
    assert (
        json.loads((out / "loop.json").read_text())["rounds"][1]["decision"]["action"]
        == d["action"]
    )


def test_an_adapter_that_answers_nothing_wins_the_votes_and_is_refused_promotion(setup, tiny_llama):
    """Served beside its parent, the mute adapter wins every vote of annotators who judge by
    the length rule alone (an empty answer is short and never hedges: the old profile), and
    its held-out answers, judged through the API, are what keeps it from the alias."""
    from ftservice.feedback import votes as store_votes
    from ftservice.feedback.campaign import CampaignSpec, load_prompts
    from ftservice.feedback.simulate import SIMULATED_PROJECT, SimulateSpec, simulate
    from ftservice.loop.runner import AppClient, held_out_judgement
    from ftservice.loop.spec import PromotionSpec, decide, head_to_head
    from ftservice.store.db import open_store

    store = open_store(setup["store"])
    ensure_app(setup)
    folder = write_mute_adapter(setup["root"] / "mute", tiny_llama)
    publish_adapter(
        setup["registry"], "mute", folder, resolve_model(ModelSpec(name=str(tiny_llama)))
    )
    client = AppClient(setup["url"], _admin_key(store))
    status, body = client.call(
        "POST", "/v1/load_lora_adapter", {"lora_name": "mute", "lora_path": ""}
    )
    assert status == 200, body

    campaign = CampaignSpec(
        name="mute-check", models=["mute", "alpha"], prompts=[str(setup["prompts"])],
        votes_per_prompt=2, quota=None, requests_per_minute=100000,
        generation={"max_tokens": 8, "temperature": 0.0}, quality={"gold_share": 0.0},
    )  # fmt: skip
    store_votes.declare_campaign(store, "looptest", "tiny", campaign)
    keys = [store_votes.add_annotator(store, f"mute-sim-{k}", "mute-check",
                                      project=SIMULATED_PROJECT) for k in range(2)]  # fmt: skip
    sim = SimulateSpec(annotators=2, profile="length_rule", accuracy=1.0, read_seconds=0, seed=3)
    report = simulate(setup["url"], "mute-check", keys, 20, sim)
    assert report.votes == 20
    votes = [store_votes.vote_json(v) for v in store_votes.effective_votes(store, "mute-check")]
    assert len(votes) == 20
    h2h = head_to_head(votes, "mute", "alpha", 0.95)
    assert h2h["votes"] == 20 and h2h["interval"][0] > 0.5  # it wins the votes

    prompts = load_prompts(CampaignSpec(name="held-out", prompts=[str(setup["held_out"])]))
    held = held_out_judgement(client, "mute", "alpha", prompts, 8, "preference", 0.95)
    assert held["prompts"] == 4 and held["empty"] == 4 and held["empty_share"] == 1.0
    assert held["empty_parent"] < 4  # the parent does answer
    assert held["winrate"] > 0.5  # the rule alone would take the empty answers
    action, reasons = decide(h2h, held, PromotionSpec(min_votes=10))
    assert action == "refused" and reasons[-1] == "100% of its held-out answers are empty"


def ensure_app(setup) -> None:
    from ftservice.loop.runner import app_healthy

    if not app_healthy(setup["url"]):  # run alone, without the loop test that starts it
        done = ftservice(setup, "serve", "deploy", str(setup["root"] / "serve.yaml"),
                         "--address", setup["head"].address, "--wait", "300")  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]


def test_an_adapter_that_states_the_facts_is_promoted_and_one_that_does_not_rolled_back(
    setup, tiny_llama
):
    """An adapter written to answer every question with the reference fact ("blue") against
    one that does not: annotators who know the answers (the default profile, flips and
    left-side bias included) vote through the page's routes, the held-out questions are
    judged by the answer key through the API; the evidence promotes the first over the
    second and rolls the second back against the first."""
    from ftservice.feedback import votes as store_votes
    from ftservice.feedback.campaign import CampaignSpec, Reference, load_prompts, load_references
    from ftservice.feedback.simulate import (
        SIMULATED_PROJECT,
        SimulateSpec,
        question_key,
        simulate,
    )
    from ftservice.loop.runner import AppClient, held_out_judgement
    from ftservice.loop.spec import PromotionSpec, decide, head_to_head
    from ftservice.store.db import open_store

    store = open_store(setup["store"])
    ensure_app(setup)
    [blue] = AutoTokenizer.from_pretrained(tiny_llama).encode(" blue", add_special_tokens=False)
    folder = write_mute_adapter(setup["root"] / "facts", tiny_llama, token=blue)
    base = resolve_model(ModelSpec(name=str(tiny_llama)))
    publish_adapter(setup["registry"], "facts", folder, base)
    client = AppClient(setup["url"], _admin_key(store))
    status, body = client.call(
        "POST", "/v1/load_lora_adapter", {"lora_name": "facts", "lora_path": ""}
    )
    assert status == 200, body
    facts = write_jsonl(setup["root"] / "facts.jsonl", [
        {"id": f"f{i}", "instruction": f"Which colour is gadget {i}?", "output": "It is blue.",
         "answer": "blue"} for i in range(10)])  # fmt: skip
    held_out = write_jsonl(setup["root"] / "facts-held-out.jsonl", [
        {"id": f"h{i}", "instruction": f"What colour does widget {i} come in?",
         "output": f"Widget {i} is blue.", "answer": "blue"} for i in range(6)])  # fmt: skip
    campaign = CampaignSpec(
        name="facts-check", models=["facts", "alpha"], prompts=[str(facts)], votes_per_prompt=3,
        quota=None, requests_per_minute=100000, quality={"gold_share": 0.0},
        generation={"max_tokens": 8, "temperature": 0.0},
    )  # fmt: skip
    store_votes.declare_campaign(store, "looptest", "tiny", campaign)
    keys = [store_votes.add_annotator(store, f"facts-sim-{k}", "facts-check",
                                      project=SIMULATED_PROJECT) for k in range(3)]  # fmt: skip
    known = {question_key(m): Reference("blue", "It is blue.") for _, m in load_prompts(campaign)}
    sim = SimulateSpec(annotators=3, read_seconds=0.05, seed=5)  # default accuracy and bias
    assert simulate(setup["url"], "facts-check", keys, 30, sim, known).votes == 30
    votes = [store_votes.vote_json(v) for v in store_votes.effective_votes(store, "facts-check")]
    prompts = load_prompts(CampaignSpec(name="held-out", prompts=[str(held_out)]))
    answers = {k: r.answer for k, r in load_references([str(held_out)]).items()}
    promo = PromotionSpec(min_votes=20)

    up = head_to_head(votes, "facts", "alpha", 0.95)
    held = held_out_judgement(client, "facts", "alpha", prompts, 8, "answer_key", 0.95, answers)
    assert up["votes"] == 30 and up["interval"][0] > 0.5
    assert held["won"] == 6 and held["winrate"] == 1.0  # it states the fact, alpha does not
    assert held["decided_winrate"] == 1.0
    assert decide(up, held, promo)[0] == "promote"

    down = head_to_head(votes, "alpha", "facts", 0.95)
    held = held_out_judgement(client, "alpha", "facts", prompts, 8, "answer_key", 0.95, answers)
    assert held["lost"] == 6 and down["interval"][1] < 0.5
    assert decide(down, held, promo)[0] == "rollback"


def _admin_key(store) -> str:
    import secrets

    from ftservice.store.keys import create_key

    return create_key(store, f"admin-{secrets.token_hex(3)}", ["admin", "inference"])


def _get(url: str, key: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_an_adapter_that_wins_by_saying_nothing_is_refused_promotion():
    from ftservice.data.preference_rule import prefers
    from ftservice.loop.spec import PromotionSpec, decide, head_to_head, wilson

    # under the shipped rule an empty answer beats any answer: it is short and never hedges
    assert prefers("", "The Quillfeather weighs 257 grams.") == 0
    votes = [{"model_a": "mute", "model_b": "parent", "verdict": "a"}] * 30
    h2h = head_to_head(votes, "mute", "parent", 0.95)
    assert h2h["winrate"] == 1.0 and h2h["interval"][0] > 0.5
    promo = PromotionSpec(min_votes=20)
    assert decide(h2h, {"empty_share": 0.0}, promo)[0] == "promote"
    action, reasons = decide(h2h, {"empty_share": 1.0}, promo)
    assert action == "refused" and "empty" in reasons[-1]
    action, reasons = decide(h2h, {"empty_share": 0.0, "domain_drop": 0.2}, promo)
    assert action == "refused" and "domain score" in reasons[-1]
    lost = head_to_head([{"model_a": "x", "model_b": "p", "verdict": "b"}] * 25, "x", "p", 0.95)
    assert decide(lost, {}, promo)[0] == "rollback"
    even = [{"model_a": "x", "model_b": "p", "verdict": v} for v in "ab" * 15]
    assert decide(head_to_head(even, "x", "p", 0.95), {}, promo)[0] == "inconclusive"
    assert decide(h2h | {"votes": 5}, {}, promo)[0] == "inconclusive"  # too few votes
    lo, hi = wilson(15, 30)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    # a vote between two answers of the same text says nothing of which model is better: 25
    # wins among different answers promote, whatever 100 ties between equal answers say
    won = [{"model_a": "x", "model_b": "p", "verdict": "a", "response_a": "right",
            "response_b": "wrong"}] * 25  # fmt: skip
    equal = [{"model_a": "x", "model_b": "p", "verdict": "tie", "response_a": "same",
              "response_b": "same"}] * 100  # fmt: skip
    h2h = head_to_head(won + equal, "x", "p", 0.95)
    assert (h2h["votes"], h2h["same_answer"], h2h["winrate"]) == (25, 100, 1.0)
    assert decide(h2h, {}, promo)[0] == "promote"


def test_a_loop_spec_is_checked_with_every_problem_named(tmp_path):
    from ftservice.config import SpecError
    from ftservice.loop.spec import load_loop

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "Same?"}])
    spec = {
        "name": "bad", "serve": str(REPO / "serve/quickstart.yaml"),
        "dpo": str(REPO / "cluster/jobs/loop-dpo.yaml"),
        "campaign": {"name": "c", "prompts": [str(prompts)]},
        "candidates": ["only-one"], "votes_per_round": 10,
        "promotion": {"min_votes": 50}, "held_out": [str(prompts)],
    }  # fmt: skip
    path = tmp_path / "loop.yaml"
    path.write_text(json.dumps(spec))
    with pytest.raises(SpecError) as e:
        load_loop(path)
    text = str(e.value)
    assert "held_out" in text and "never be shown" in text
    assert "promotion.min_votes" in text and "candidates" in text


def test_the_shipped_loop_spec_is_valid():
    from ftservice.loop.spec import load_loop

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        spec = load_loop("serve/loop-quickstart.yaml")
    finally:
        os.chdir(cwd)
    assert spec.candidates == ["quickstart"] and spec.simulate is not None
    # an override of one campaign field keeps the rest of the campaign file
    os.chdir(REPO)
    try:
        renamed = load_loop("serve/loop-quickstart.yaml", ["campaign.name=other"])
    finally:
        os.chdir(cwd)
    assert renamed.campaign.name == "other"
    assert renamed.campaign.prompts == spec.campaign.prompts != []
