"""Preference collection without a server: the vote store on SQLite and the local PostgreSQL
(issue, answers, replays, corrections, overlap, quotas, dump/load, forget), migrations from the
previous revision, the leaderboard on votes simulated from known strengths, and exports that
`ftservice data check` reads."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect, text

from ftservice.feedback import votes
from ftservice.feedback.campaign import CampaignSpec, choose_pair, competitors
from ftservice.feedback.export import export_rows, write_export
from ftservice.feedback.leaderboard import leaderboard
from ftservice.store.db import make_engine, open_store, upgrade

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [(f"p{i}", [{"role": "user", "content": f"Question {i}?"}]) for i in range(4)]
MODELS = ["base", "alpha", "beta"]
PRINTS = {"base": "f0", "alpha": "f1", "beta": "f2"}


def campaign(**kw) -> CampaignSpec:
    return CampaignSpec.model_validate({"name": "c1", "prompts": [], "allow_custom_prompts": True}
                                       | kw)  # fmt: skip


def answer_both(store, issued) -> None:
    c = issued.comparison
    for model in (c.model_a, c.model_b):
        out = {"text": f"{model} says <b>hi</b>", "finish_reason": "stop", "completion_tokens": 3}
        votes.store_answer(store, c.item, model, out, 5.0, 20.0)


def issue(store, spec, who, rng, **kw):
    return votes.issue(store, spec, who, MODELS, PRINTS, PROMPTS, rng, **kw)


def test_votes_are_idempotent_corrections_are_new_rows_and_only_the_latest_counts(store):
    spec = campaign(quota=10)
    votes.declare_campaign(store, "app", "base", spec)
    rng = random.Random(0)
    first = issue(store, spec, "ann", rng)
    assert issue(store, spec, "ann", rng).comparison.id == first.comparison.id  # pending first
    cid = first.comparison.id
    with pytest.raises(votes.FeedbackError, match="no stored answer") as e:
        votes.cast_vote(store, "ann", "v-0000001", cid, "a")
    assert e.value.status == 409
    answer_both(store, first)
    stored, replayed = votes.cast_vote(store, "ann", "v-0000001", cid, "a", comment="<script>")
    assert not replayed and stored["verdict"] == "a" and stored["comment"] == "<script>"
    assert stored["model_a"] == first.comparison.model_a and stored["response_a"].endswith("hi</b>")
    again, replayed = votes.cast_vote(store, "ann", "v-0000001", cid, "b")  # a replay
    assert replayed and again["verdict"] == "a"
    with pytest.raises(votes.FeedbackError, match="already voted") as e:
        votes.cast_vote(store, "ann", "v-0000002", cid, "b")
    assert e.value.status == 409
    with pytest.raises(votes.FeedbackError, match="was issued to you") as e:
        votes.cast_vote(store, "other", "v-0000003", cid, "b")  # someone else's comparison
    assert e.value.status == 404
    with pytest.raises(votes.FeedbackError, match="vote_id is taken"):
        votes.cast_vote(store, "other", "v-0000001", cid, "b")  # never shows another's vote
    # a campaign that does not reveal the models: a correction counts
    fixed, _ = votes.cast_vote(
        store, "ann", "v-0000004", cid, "tie", replaces="v-0000001", reveal=False
    )
    assert fixed["replaces"] == "v-0000001" and not fixed["after_reveal"]
    with pytest.raises(votes.FeedbackError, match="already corrected"):
        votes.cast_vote(store, "ann", "v-0000005", cid, "b", replaces="v-0000001", reveal=False)
    counted = votes.effective_votes(store, "c1")
    assert [v.vote_id for v in counted] == ["v-0000004"]
    with store() as session:
        assert session.execute(text("SELECT count(*) FROM votes")).scalar() == 2
        first_row = session.execute(
            text("SELECT verdict FROM votes WHERE vote_id = 'v-0000001'")
        ).scalar()
    assert first_row == "a"  # the corrected vote is kept as it was
    assert votes.progress(store, "c1", "ann") == 1


def test_the_same_vote_sent_twice_from_fifty_threads_is_stored_once(store):
    spec = campaign(quota=None, max_pending=10)  # four typed prompts each before a vote
    votes.declare_campaign(store, "app", "base", spec)
    rng = random.Random(1)
    issued = []
    for k in range(40):
        i = issue(store, spec, f"ann{k % 10}", rng, custom=[{"role": "user", "content": f"q{k}"}])
        answer_both(store, i)
        issued.append(i.comparison)
    attempts = [(c, f"vote-{c.id}") for c in issued] * 2
    random.Random(2).shuffle(attempts)

    def send(attempt):
        comparison, vote_id = attempt
        return votes.cast_vote(store, comparison.annotator, vote_id, comparison.id, "b")

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(send, attempts))
    assert sum(not replayed for _, replayed in results) == 40
    with store() as session:
        assert session.execute(text("SELECT count(*) FROM votes")).scalar() == 40


def test_overlap_quota_and_prompts_per_item(store):
    spec = campaign(allow_custom_prompts=False, prompts=["x"], overlap=2, votes_per_prompt=1,
                    quota=3)  # fmt: skip
    votes.declare_campaign(store, "app", "base", spec)
    rng = random.Random(3)
    seen = {}
    for who in ("ann1", "ann2"):
        for _ in range(3):
            i = issue(store, spec, who, rng)
            answer_both(store, i)
            votes.cast_vote(store, who, votes.new_vote_id(), i.comparison.id, "a")
            seen.setdefault(who, []).append(i.comparison)
        assert issue(store, spec, who, rng) is None  # the quota of 3
    items1 = {c.item for c in seen["ann1"]}
    items2 = {c.item for c in seen["ann2"]}
    assert items1 == items2 and len(items1) == 3  # the second annotator got the same items
    by_item = {c.item: c for c in seen["ann1"]}
    for c in seen["ann2"]:
        twin = by_item[c.item]
        assert {c.model_a, c.model_b} == {twin.model_a, twin.model_b} and c.seed == twin.seed
    assert len({c.prompt_id for c in seen["ann1"]}) == 3  # one item per prompt (votes_per_prompt)
    ann3 = [issue(store, spec, "ann3", rng) for _ in range(1)]
    assert ann3[0] is not None and ann3[0].comparison.item not in items1  # overlap 2 is full


def test_a_model_against_itself_gives_a_pair_of_its_own_samples_and_no_rating(store):
    """self_pairs: an item pits one model against itself; its two answers are stored apart
    (the model's and its second sample's), each annotator of the item gets a coin for which
    is left, a vote picks a sample (two annotators agree about the sample, not the side), the
    export pairs the model's own two answers, and the ratings leave it out."""
    from ftservice.feedback.campaign import answer_slots

    spec = campaign(allow_custom_prompts=False, prompts=["x"], overlap=2, votes_per_prompt=1,
                    quota=None, self_pairs=1.0)  # fmt: skip
    votes.declare_campaign(store, "app", "base", spec)
    rng = random.Random(5)
    lefts = []
    for k in range(4):
        for who in ("ann1", "ann2"):
            c = issue(store, spec, who, rng).comparison
            assert c.model_a == c.model_b and c.model_a in MODELS
            slots = answer_slots(c.model_a, c.model_b, c.swapped)
            assert sorted(slots) == [c.model_a, c.model_a + "#2"]
            for slot in slots:
                out = {"text": f"{slot} answer {k}", "finish_reason": "stop",
                       "completion_tokens": 3}  # fmt: skip
                votes.store_answer(store, c.item, slot, out, 5.0, 20.0)
            # both annotators pick the same sample, wherever it is shown: the first on even
            # items, the second on odd ones
            pick = c.model_a if k % 2 == 0 else c.model_a + "#2"
            verdict = "a" if slots[0] == pick else "b"
            stored, _ = votes.cast_vote(store, who, votes.new_vote_id(), c.id, verdict)
            assert stored["response_a"] == f"{slots[0]} answer {k}"  # the texts as shown
            lefts.append(slots[0].endswith("#2"))
    assert set(lefts) == {True, False}  # the coin put each sample on the left
    rows, items = votes.effective_rows(store, "c1")
    assert len(rows) == 8 and len(set(items.values())) == 4
    pairs, lineage, counts = export_rows(rows, items, "trl")
    assert counts["pairs"] == 4 and "dropped_conflict" not in counts
    for row, line in zip(pairs, lineage, strict=True):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        k = int(chosen.rsplit(" ", 1)[1])  # "<slot> answer <k>"
        model = rejected.split(" ")[0].removesuffix("#2")
        first, second = f"{model} answer {k}", f"{model}#2 answer {k}"
        assert (chosen, rejected) == ((first, second) if k % 2 == 0 else (second, first))
        assert {line["chosen_model"], line["rejected_model"]} == {model, model + "#2"}
    board = leaderboard(rows, "base", items=items)
    assert board["ratings"] == [] and board["votes"] == 8
    agreement = board["agreement"]  # every item judged alike by its two annotators
    assert agreement["items"] == 4 and agreement["pairwise"] == 1.0


def test_a_written_right_answer_beats_each_distinct_wrong_answer_once():
    """Two annotators find both answers wrong and write the same right one; the item's two
    answers are the same text (a model against itself): one pair, the written answer over it."""
    vote = {"comparison_id": "c1", "model_a": "alpha", "model_b": "alpha", "swapped": False,
            "verdict": "both_bad", "prompt": [{"role": "user", "content": "How heavy?"}],
            "response_a": "It weighs 5 kg.", "response_b": "It weighs 5 kg."}  # fmt: skip
    right = "The Quillfeather weighs 257 grams."
    votes_ = [vote | {"vote_id": f"v{k}", "annotator": f"u{k}", "better_answer": right}
              for k in range(2)]  # fmt: skip
    rows, lineage, counts = export_rows(votes_, {"c1": "item"}, "trl")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        (right, "It weighs 5 kg.")
    ]
    assert counts["pairs_from_edits"] == 1 and counts["dropped_same_answer"] == 1
    assert lineage[0]["chosen_model"] == "human"


def test_a_self_pair_campaign_needs_sampling():
    from pydantic import ValidationError

    from ftservice.feedback.campaign import campaign_problems

    greedy = campaign(self_pairs=0.5, generation={"temperature": 0.0})
    [problem] = campaign_problems(greedy)
    assert problem.path == "self_pairs" and "temperature above 0" in problem.message
    assert campaign_problems(campaign(self_pairs=0.5)) == []
    with pytest.raises(ValidationError, match="self_pairs"):
        campaign(self_pairs=1.5)


def test_dump_load_and_forget(store, tmp_path):
    spec = campaign()
    votes.declare_campaign(store, "app", "base", spec)
    rng = random.Random(4)
    for who in ("ann1", "ann2"):
        for k in range(2):
            i = issue(store, spec, who, rng, custom=[{"role": "user", "content": f"{who} {k}"}])
            answer_both(store, i)
            votes.cast_vote(store, who, votes.new_vote_id(), i.comparison.id, "b",
                            comment="meh" if k == 0 else None)  # fmt: skip
    lines = votes.dump(store, "c1")
    assert sum(line["table"] == "votes" for line in lines) == 4
    other = open_store(f"sqlite:///{tmp_path / 'restored.db'}")
    assert votes.load(other, lines)["votes"] == 4
    assert votes.load(other, lines) == {}  # loading twice adds nothing
    assert len(votes.effective_votes(other, "c1")) == 4
    with pytest.raises(votes.FeedbackError, match=r"dump:2: not a dump line"):
        votes.load(other, [lines[0], {"table": "users", "row": {}}])
    counts = votes.forget(store, "ann1")
    assert counts["votes"] == 2 and counts["comments"] == 1 and counts["comparisons"] == 2
    left = votes.effective_votes(store, "c1")
    assert {v.annotator for v in left} == {"ann2"} and len(left) == 2
    with store() as session:
        prompts = session.execute(text("SELECT prompt FROM comparisons")).scalars().all()
    assert not any("ann1" in p for p in prompts)  # their typed prompts are gone too


def test_a_database_of_the_previous_revision_keeps_its_rows(tmp_path):
    from alembic import command
    from alembic.config import Config

    from ftservice.store.db import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0002")
    assert "votes" not in inspect(engine).get_table_names()
    with engine.begin() as c:
        c.execute(text("INSERT INTO api_keys (name, prefix, digest, scopes, project, created_at, "
                       "requests, prompt_tokens, completion_tokens) VALUES ('old', 'fts-abcd', "
                       "'d1', 'inference', 'default', '2026-01-01', 5, 6, 7)"))  # fmt: skip
        c.execute(text("INSERT INTO disabled_adapters VALUES ('app', 'x', '2026-01-01', 'k')"))
    upgrade(engine)
    assert {"votes", "comparisons", "answers", "campaigns"} <= set(
        inspect(engine).get_table_names()
    )
    with engine.connect() as c:
        assert c.execute(text("SELECT name, requests FROM api_keys")).all() == [("old", 5)]
        assert c.execute(text("SELECT count(*) FROM disabled_adapters")).scalar() == 1


def test_pairs_uniform_and_adaptive():
    rng = random.Random(5)
    models = ["a", "b", "c", "d"]
    uniform = [frozenset(choose_pair(models, "uniform", rng)) for _ in range(3000)]
    counts = np.array(list({p: uniform.count(p) for p in set(uniform)}.values()))
    assert len(counts) == 6 and counts.min() > 400  # every pair about 500 times
    sides = [choose_pair(models, "uniform", rng)[0] for _ in range(2000)]
    assert 0.4 < sides.count("a") / sides.count("d") < 2.5  # both orders happen
    # adaptive: close pairs with few votes come up more than settled, distant ones
    ratings = {"a": 1000, "b": 1010, "c": 1400, "d": 600}
    votes_so_far = {frozenset(("a", "b")): 0, frozenset(("c", "d")): 200}
    picks = [frozenset(choose_pair(models, "adaptive", rng, votes_so_far, ratings))
             for _ in range(3000)]  # fmt: skip
    assert picks.count(frozenset("ab")) > 5 * picks.count(frozenset("cd")) > 0
    assert competitors(campaign(models=["al*", "base"]), ["base", "alpha", "beta"]) == [
        "base", "alpha"]  # fmt: skip
    with pytest.raises(ValueError, match="needs two models"):
        choose_pair(["a"], "uniform", rng)


def simulated_votes(strength: dict[str, float], n: int, rng: np.random.Generator) -> list[dict]:
    names = list(strength)
    out = []
    for k in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + 10 ** (-(strength[a] - strength[b]) / 400))
        tie = 0.4 * min(p, 1 - p)  # ties keep a's expected score at p (a tie is half a win)
        u = rng.random()
        verdict = "tie" if u < tie else ("a" if u < tie + p - tie / 2 else "b")
        out.append({"model_a": a, "model_b": b, "verdict": verdict, "annotator": f"s{k % 5}",
                    "comparison_id": str(k), "latency": {"issue_to_vote_ms": 1000}})  # fmt: skip
    return out


def test_the_leaderboard_recovers_known_strengths_with_honest_intervals():
    """Votes simulated from known ratings (the base at 1000, some ties): over 50 replications
    the fitted order is the true one and the 95% bootstrap intervals hold the true values in
    at least 85% of cases."""
    truth = {"base": 1000.0, "a": 1150.0, "b": 900.0, "c": 1300.0}
    order = sorted(truth, key=lambda m: -truth[m])
    rng = np.random.default_rng(6)
    covered = total = right_order = 0
    for rep in range(50):
        board = leaderboard(simulated_votes(truth, 400, rng), "base", resamples=100, seed=rep)
        rows = {r["model"]: r for r in board["ratings"]}
        right_order += [r["model"] for r in board["ratings"]] == order
        assert rows["base"]["rating"] == pytest.approx(1000.0)
        for m, r in rows.items():
            if m != "base":
                total += 1
                covered += r["ci95"][0] <= truth[m] <= r["ci95"][1]
    assert right_order >= 45, right_order
    assert covered / total >= 0.85, covered / total
    win = board["winrate"]
    assert win["c"]["b"] > 0.7 and win["b"]["c"] < 0.3


def test_agreement_between_annotators_on_shared_items():
    base = {"latency": {"issue_to_vote_ms": 500}}
    rows, items = [], {}
    # three annotators on 6 items; a and b always agree, c disagrees on two
    for item in range(6):
        for who in ("a", "b", "c"):
            verdict = "a" if item % 2 else "b"
            if who == "c" and item < 2:
                verdict = "tie"
            cid = f"{item}-{who}"
            items[cid] = f"item{item}"
            rows.append(base | {"model_a": "x", "model_b": "y", "verdict": verdict,
                                "annotator": who, "comparison_id": cid})  # fmt: skip
    agree = leaderboard(rows, "x", resamples=20, items=items)["agreement"]
    assert agree["items"] == 6 and agree["fleiss_raters"] == 3
    assert agree["pairwise"] == pytest.approx(14 / 18, abs=1e-3)
    assert agree["cohen_kappa"]["a|b"] == 1.0 and agree["cohen_kappa"]["a|c"] < 1.0
    assert 0 < agree["fleiss_kappa"] < 1


def test_exports_resolve_conflicts_and_pass_data_check(tmp_path, cli_env):
    def vote(cid, who, verdict, a="x", b="y", edit=None):
        return {"vote_id": f"{cid}-{who}", "comparison_id": cid, "annotator": who,
                "verdict": verdict, "model_a": a, "model_b": b, "better_answer": edit,
                "prompt": [{"role": "user", "content": f"prompt {cid}"}],
                "response_a": f"answer of {a}", "response_b": f"answer of {b}"}  # fmt: skip

    rows = [
        vote("1", "u1", "a"), vote("1b", "u2", "b", a="y", b="x"), vote("1c", "u3", "tie"),
        vote("2", "u1", "a"), vote("2b", "u2", "b"),  # a conflict: dropped
        vote("3", "u1", "tie"), vote("4", "u1", "both_bad", edit="A hand-written answer."),
    ]  # fmt: skip
    items = {"1": "i1", "1b": "i1", "1c": "i1", "2": "i2", "2b": "i2", "3": "i3", "4": "i4"}
    for fmt, fmt_name in (("trl", "preference"), ("openai", "openai_dpo"), ("kto", "kto")):
        data, lineage, counts = export_rows(rows, items, fmt)
        if fmt != "kto":
            assert counts == {"pairs": 1, "dropped_conflict": 1, "dropped_tie": 1,
                              "dropped_both_bad": 1, "pairs_from_edits": 2, "rows": 3,
                              "items": 4}  # fmt: skip
            first = data[0]
            chosen = first["chosen"] if fmt == "trl" else first["preferred_output"]
            assert chosen == [{"role": "assistant", "content": "answer of x"}]
            assert lineage[0]["vote_ids"] == ["1-u1", "1b-u2", "1c-u3"]
        else:
            labels = [(r["completion"][0]["content"], r["label"]) for r in data]
            assert ("answer of x", True) in labels and ("answer of y", False) in labels
            assert ("A hand-written answer.", True) in labels
        out = tmp_path / f"{fmt}.jsonl"
        write_export(data, lineage, counts, out, {"format": fmt})
        assert json.loads((tmp_path / f"{fmt}.jsonl.lineage.json").read_text())["counts"]
        check = subprocess.run([sys.executable, "-m", "ftservice", "data", "check", str(out)],
                               capture_output=True, text=True, env=cli_env)  # fmt: skip
        assert check.returncode == 0, check.stderr
        assert fmt_name in check.stdout, check.stdout


@pytest.mark.slow
def test_exported_pairs_train_a_dpo_step(tmp_path, tiny_llama):
    """The TRL and OpenAI exports are training data as they are: one DPO step from each moves
    every trainable parameter (in-process, as a Ray worker builds the trainer)."""
    import torch
    from test_dpo import spec_for

    from ftservice.models import build_model, load_tokenizer, resolve_model
    from ftservice.train.dpo import dpo_trainer

    rows = [{"vote_id": f"v{k}", "comparison_id": f"c{k}", "annotator": "u", "verdict": "a",
             "model_a": "alpha", "model_b": "beta",
             "prompt": [{"role": "user", "content": f"How heavy is product {k}?"}],
             "response_a": f"Product {k} weighs {100 + k} grams.",
             "response_b": "I think it might be heavy, perhaps, I am not sure."}
            for k in range(8)]  # fmt: skip
    items = {f"c{k}": f"i{k}" for k in range(8)}
    base_spec = spec_for(tmp_path, tiny_llama)
    model_ref = resolve_model(base_spec.model)
    start = tmp_path / "start"  # an SFT-like adapter: B non-zero, so A gets gradients too
    adapter = build_model(base_spec, model_ref)
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    adapter.save_pretrained(start)
    for fmt in ("trl", "openai"):
        data, lineage, counts = export_rows(rows, items, fmt)
        path = tmp_path / f"{fmt}.jsonl"
        write_export(data, lineage, counts, path, {"format": fmt})
        spec = spec_for(
            tmp_path, tiny_llama, name=f"dpo-{fmt}", stage="dpo", data={"train": [str(path)]},
            dpo={"beta": 0.1, "parent": str(start)},
            train={"max_steps": 1, "learning_rate": 1e-2, "micro_batch_size": 4},
        )  # fmt: skip
        trainer = dpo_trainer(
            spec, model_ref, {"name": "start", "location": str(start)},
            load_tokenizer(model_ref), str(tmp_path / f"w-{fmt}"), 1, [],
        )  # fmt: skip
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                  if p.requires_grad}  # fmt: skip
        trainer.train()
        assert trainer.state.global_step == 1
        after = dict(trainer.model.named_parameters())
        same = [n for n, p in before.items() if torch.equal(p, after[n])]
        assert same == [], same[:3]
        assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_the_feedback_commands(tmp_path, cli_env):
    """annotators add, leaderboard (table, JSON, both plots), export, dump, load and forget,
    as a user runs them against the store."""
    url = f"sqlite:///{tmp_path / 'state' / 'ftservice.db'}"
    store = open_store(url)
    spec = campaign(quota=None)
    votes.declare_campaign(store, "app", "base", spec)

    def ftservice(*args, check=True):
        out = subprocess.run([sys.executable, "-m", "ftservice", *args, "--store", url],
                             capture_output=True, text=True, env=cli_env, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0 or not check, out.stderr
        return out

    key = ftservice("feedback", "annotators", "add", "rater1", "--campaign", "c1").stdout.strip()
    assert key.startswith("fts-") and "rater1" in ftservice("keys", "list").stdout
    again = ftservice("feedback", "annotators", "add", "rater1", "--campaign", "c1")
    assert again.stdout == "" and "existing key" in again.stderr  # never a second secret
    rng = random.Random(7)
    strengths = {"base": 0.5, "alpha": 0.8, "beta": 0.2}
    for k in range(60):
        i = issue(store, spec, f"rater{k % 3}", rng, custom=[{"role": "user", "content": str(k)}])
        answer_both(store, i)
        a, b = i.comparison.model_a, i.comparison.model_b
        verdict = "a" if rng.random() < strengths[a] / (strengths[a] + strengths[b]) else "b"
        votes.cast_vote(store, f"rater{k % 3}", votes.new_vote_id(), i.comparison.id, verdict)
    board = json.loads(ftservice("feedback", "leaderboard", "c1", "--json", "--resamples",
                                 "50", "--out", "plots").stdout)  # fmt: skip
    assert board["votes"] == 60 and board["ratings"][0]["model"] == "alpha"
    assert [r["model"] for r in board["ratings"] if r["model"] == "base"] and any(
        r["rating"] == 1000.0 for r in board["ratings"])  # fmt: skip
    for name in ("leaderboard.png", "winrate.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000
    table = ftservice("feedback", "leaderboard", "c1", "--resamples", "20").stdout
    assert "alpha" in table and "95% interval" in table.lower()
    out = ftservice("feedback", "export", "c1", "--format", "openai", "--out", "o.jsonl").stdout
    assert "wrote 60 rows" in out and (tmp_path / "o.jsonl.lineage.json").is_file()
    bad = ftservice("feedback", "export", "c1", "--format", "csv", check=False)
    assert bad.returncode != 0 and "trl, openai, kto" in bad.stderr
    unknown = ftservice("feedback", "leaderboard", "nope", check=False)
    assert unknown.returncode != 0 and "known: c1" in unknown.stderr
    ftservice("feedback", "dump", "c1", "--out", "c1.jsonl")
    restored = f"sqlite:///{tmp_path / 'restored.db'}"
    load = subprocess.run([sys.executable, "-m", "ftservice", "feedback", "load", "c1.jsonl",
                           "--store", restored], capture_output=True, text=True, env=cli_env,
                          cwd=tmp_path)  # fmt: skip
    assert load.returncode == 0 and "votes 60" in load.stdout, load.stderr
    assert len(votes.effective_votes(open_store(restored), "c1")) == 60
    gone = ftservice("feedback", "forget", "rater1", "--yes").stdout
    assert "20 votes" in gone
    assert len(votes.effective_votes(store, "c1")) == 40


def test_a_kto_export_is_read_as_unpaired_answers_and_a_dpo_job_refuses_it(tmp_path, tiny_llama):
    from test_dpo import spec_for

    from ftservice.data.loaders import DataError, load_rows
    from ftservice.train.driver import _refuse_kinds

    vote = {"vote_id": "v1", "comparison_id": "c1", "annotator": "u", "verdict": "b",
            "model_a": "x", "model_b": "y", "prompt": [{"role": "user", "content": "Hi?"}],
            "response_a": "long hedge", "response_b": "Plain fact."}  # fmt: skip
    data, lineage, counts = export_rows([vote], {"c1": "i1"}, "kto")
    path = tmp_path / "kto.jsonl"
    write_export(data, lineage, counts, path, {"format": "kto"})
    rows = load_rows([str(path)])
    assert [(r["kind"], r["chosen"], r["rejected"]) for r in rows] == [
        ("unpaired", "Plain fact.", None), ("unpaired", None, "long hedge")]  # fmt: skip
    spec = spec_for(tmp_path, tiny_llama, stage="dpo", data={"train": [str(path)]},
                    dpo={"beta": 0.1, "parent": str(tmp_path)})  # fmt: skip
    with pytest.raises(DataError, match=r"unpaired .*--format trl"):
        _refuse_kinds(spec, rows, "data.train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi?", "completion": "Yes.", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'label' must be true or false"):
        load_rows([str(bad)])


# ---- quality control ----------------------------------------------------------------------


def test_a_correction_after_the_reveal_is_stored_and_never_counts(store, tmp_path):
    spec = campaign(quota=10)
    votes.declare_campaign(store, "app", "base", spec)
    first = issue(store, spec, "ann", random.Random(0))
    cid = first.comparison.id
    answer_both(store, first)
    votes.cast_vote(store, "ann", "v-0000001", cid, "a")  # the page reveals the models now
    late, _ = votes.cast_vote(store, "ann", "v-0000002", cid, "b", replaces="v-0000001",
                              better_answer="my own answer")  # fmt: skip
    assert late["after_reveal"] and late["verdict"] == "b"
    later, _ = votes.cast_vote(store, "ann", "v-0000003", cid, "tie", replaces="v-0000002")
    assert later["after_reveal"]
    counted = votes.effective_votes(store, "c1")
    assert [v.vote_id for v in counted] == ["v-0000001"]  # stored, never counted
    rows = [votes.vote_json(v) for v in counted]
    pairs, _, counts = export_rows(rows, votes.items_of(store, [cid]), "trl")
    winner = first.comparison.model_a
    assert counts == {"pairs": 1, "rows": 1, "items": 1}  # no pair from the late better answer
    assert pairs[0]["chosen"][0]["content"] == f"{winner} says <b>hi</b>"
    with store() as session:
        assert session.execute(text("SELECT count(*) FROM votes")).scalar() == 3


def test_an_annotator_holds_at_most_max_pending_comparisons_and_the_quota_counts_issued(store):
    spec = campaign(quota=4, max_pending=2)
    votes.declare_campaign(store, "app", "base", spec)
    rng = random.Random(3)
    typed = [issue(store, spec, "ann", rng, custom=[{"role": "user", "content": f"q{k}"}])
             for k in range(2)]  # fmt: skip
    with pytest.raises(votes.FeedbackError, match="hold 2 comparisons without a vote") as e:
        issue(store, spec, "ann", rng, custom=[{"role": "user", "content": "one more"}])
    assert e.value.status == 429 and e.value.code == "too_many_pending"
    answer_both(store, typed[0])
    votes.cast_vote(store, "ann", "v-0000001", typed[0].comparison.id, "a")
    third = issue(store, spec, "ann", rng, custom=[{"role": "user", "content": "q3"}])
    assert third is not None
    for k, held in enumerate((typed[1], third)):
        answer_both(store, held)
        votes.cast_vote(store, "ann", f"v-000001{k}", held.comparison.id, "a")
    assert issue(store, spec, "ann", rng, custom=[{"role": "user", "content": "q4"}])
    # four issued (three voted): the quota of 4 counts comparisons issued, not votes
    assert votes.progress(store, "c1", "ann") == 3
    assert issue(store, spec, "ann", rng, custom=[{"role": "user", "content": "q5"}]) is None


def domain_prompts(tmp_path, n: int = 24) -> tuple[str, list]:
    """A prompt file of the shipped domain questions (with their reference answers)."""
    from ftservice.feedback.campaign import load_prompts

    path = tmp_path / "domain.jsonl"
    lines = (REPO / "data/domain/train.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n")
    return str(path), load_prompts(CampaignSpec(name="x", prompts=[str(path)]))


def test_gold_comparisons_come_in_their_share_with_a_reference_and_a_distractor(store, tmp_path):
    from ftservice.data.judges import answer_matches
    from ftservice.feedback.campaign import load_references
    from ftservice.serve.arena import gold_pairs

    path, prompts = domain_prompts(tmp_path)
    spec = campaign(prompts=[path], allow_custom_prompts=False, quota=None, votes_per_prompt=50,
                    quality={"gold_share": 0.25})  # fmt: skip
    gold = gold_pairs(spec)
    references = load_references([path])
    assert set(gold) == set(references) and len(gold) == 24
    for pid, (right, wrong) in gold.items():
        assert answer_matches(right, references[pid].answer)
        assert not answer_matches(wrong, references[pid].answer)
    votes.declare_campaign(store, "app", "base", spec)
    rng, golden = random.Random(5), 0
    for k in range(240):
        got = votes.issue(store, spec, "ann", MODELS, PRINTS, prompts, rng, gold=gold)
        c = got.comparison
        if c.gold:
            golden += 1
            assert {c.model_a, c.model_b} == set(votes.GOLD_MODELS)
            right = got.answers["reference"].text
            assert right == gold[c.prompt_id][0]
            assert (c.gold == "a") == (c.model_a == "reference")
        else:
            answer_both(store, got)
        votes.cast_vote(store, "ann", f"v-{k:07d}", c.id, "a")
    # 240 draws at 0.25: mean 60, sd 6.7; a share off by 0.1 (24) is 3.6 sd away
    assert 40 <= golden <= 80
    off = campaign(prompts=[path], allow_custom_prompts=False, name="c2",
                   quality={"enabled": False})  # fmt: skip
    assert gold_pairs(off) == {}


def quality_votes(shared: list[str], gold: list[str]) -> tuple[list[dict], dict[str, str]]:
    """Two careful annotators who agree on every shared item (a) and get every gold item right
    (b), and a third annotator with the given verdicts on 12 shared and 4 gold items."""
    rows, items = [], {}
    speed = {"careful1": 9000, "careful2": 8000, "spam": 300}
    for k in range(12):
        for who in ("careful1", "careful2", "spam"):
            verdict = shared[k] if who == "spam" else "a"
            cid = f"{who}-{k}"
            items[cid] = f"item{k}"
            rows.append({"vote_id": f"v-{cid}", "comparison_id": cid, "annotator": who,
                         "verdict": verdict, "model_a": "alpha", "model_b": "beta",
                         "gold": None, "better_answer": "mine" if k == 0 else None,
                         "latency": {"issue_to_vote_ms": speed[who]}})  # fmt: skip
    for k in range(4):
        for who in ("careful1", "careful2", "spam"):
            cid = f"gold-{who}-{k}"
            items[cid] = cid
            rows.append({"vote_id": f"v-{cid}", "comparison_id": cid, "annotator": who,
                         "verdict": "b" if who != "spam" else gold[k], "gold": "b",
                         "model_a": "distractor", "model_b": "reference", "better_answer": None,
                         "latency": {"issue_to_vote_ms": speed[who]}})  # fmt: skip
    return rows, items


def test_quality_leaves_out_an_unreliable_annotator_only_when_it_is_on():
    from ftservice.feedback.campaign import QualitySpec
    from ftservice.feedback.quality import assess, counted_votes

    rows, items = quality_votes(["b"] * 12, ["b"] * 4)  # always right-hand, fast
    on = counted_votes(rows, items, QualitySpec())
    spam = on.annotators["spam"]
    assert spam.gold == 4 and spam.gold_right == 4 and spam.shared == 24 and spam.agreed == 0
    assert spam.reliability < 0.3 and not spam.counts and not spam.trusted
    assert any("within 2 s" in f for f in spam.flags)
    assert any("picked the right answer" in f for f in spam.flags)
    careful = on.annotators["careful1"]
    assert careful.shared == 24 and careful.agreed == 12  # with careful2, not with the spammer
    assert careful.reliability > 0.85 and careful.counts and careful.trusted and not careful.flags
    assert len(on.votes) == 24 and {v["annotator"] for v in on.votes} == {"careful1", "careful2"}
    assert on.dropped == {"gold_votes": 12, "unreliable_votes": 12, "unreliable_annotators": 1}
    off = counted_votes(rows, items, QualitySpec(enabled=False))
    assert len(off.votes) == 36 and off.dropped["gold_votes"] == 12
    assert "unreliable_votes" not in off.dropped
    # a better answer is exported only from an annotator who passed their checks, even off
    assert [v["annotator"] for v in off.votes if v["better_answer"]] == ["careful1", "careful2"]
    assert off.dropped["better_answers_untrusted"] == 1
    # the same annotator agreeing with the others is reliable (the check can fail both ways)
    honest, items = quality_votes(["a"] * 12, ["b"] * 4)
    assert assess(honest, items, QualitySpec())["spam"].reliability == 1.0


def test_a_voter_at_chance_vouches_for_nobody_and_drags_nobody_down():
    """A careful annotator who shares most items with a random voter: the random voter agrees
    with them on a quarter (chance over four verdicts), so its checks weigh nothing and the
    careful one is judged by the careful annotator they share the rest with."""
    from ftservice.feedback.campaign import QualitySpec
    from ftservice.feedback.quality import assess

    rows, items = [], {}

    def vote(who: str, item: str, verdict: str, gold: str | None = None) -> None:
        cid = f"{who}-{item}"
        items[cid] = item
        rows.append({"vote_id": cid, "comparison_id": cid, "annotator": who, "verdict": verdict,
                     "model_a": "alpha", "model_b": "beta", "gold": gold,
                     "latency": {"issue_to_vote_ms": 5000}})  # fmt: skip

    for k in range(12):  # with the random voter: it agrees on 3 of 12
        vote("careful", f"r{k}", "a")
        vote("random", f"r{k}", "a" if k < 3 else ("b", "tie", "both_bad")[k % 3])
    for k in range(4):  # with another careful annotator: they agree
        vote("careful", f"c{k}", "a")
        vote("other", f"c{k}", "a")
        vote("random", f"g{k}", "b" if k == 0 else "a", gold="b")  # 1 of 4 gold right
        vote("other", f"g{k}", "b", gold="b")
    quality = assess(rows, items, QualitySpec())
    assert quality["random"].reliability == 0.25 and not quality["random"].counts
    assert quality["careful"].agreed == 7 and quality["careful"].shared == 16
    assert quality["careful"].reliability == 1.0  # 7 of 16 unweighted
