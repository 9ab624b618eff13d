"""The vote store's operations: campaigns and their annotators, issuing comparisons, the
answers, votes (replays and corrections), progress, backup and restore, forgetting a person.
Every table here is insert-only but for the campaign's declared spec."""

from __future__ import annotations

import json
import random
import secrets
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from ftservice.errors import FtserviceError
from ftservice.feedback.campaign import CampaignSpec, answer_slots, choose_pair
from ftservice.feedback.rounds import check_round_open, counted
from ftservice.store.keys import KeyStoreError, create_key
from ftservice.store.models import (
    Answer,
    ApiKey,
    Campaign,
    CampaignAnnotator,
    Comparison,
    Vote,
    WebSession,
)

VERDICTS = ("a", "b", "tie", "both_bad")
VOTE_FIELDS = (
    "vote_id", "comparison_id", "replaces", "campaign", "annotator", "verdict", "source", "comment",
    "better_answer", "prompt", "response_a", "response_b", "model_a", "model_b",
    "fingerprint_a", "fingerprint_b", "swapped", "params", "seed", "latency", "gold",
    "after_reveal", "issued_at", "created_at",
)  # fmt: skip
GOLD_MODELS = ("reference", "distractor")
"""The names a gold comparison's two sides are stored (and revealed) under."""


class FeedbackError(FtserviceError):
    """A feedback operation that cannot be done; `status` is the HTTP status it answers."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.code = status, code


def _insert(session: Session):
    return (postgresql if session.get_bind().dialect.name == "postgresql" else sqlite).insert


def _now() -> datetime:
    return datetime.now(UTC)


# ---- campaigns and annotators ---------------------------------------------------------------


def declare_campaign(store: sessionmaker[Session], app: str, base: str, spec: CampaignSpec) -> None:
    """Record the campaign as this app runs it (the CLI reads it back)."""
    with store.begin() as session:
        session.merge(
            Campaign(name=spec.name, app=app, base=base, spec=spec.model_dump_json(),
                     declared_at=_now())
        )  # fmt: skip


def app_campaigns(store: sessionmaker[Session], app: str) -> list[CampaignSpec]:
    """The campaigns declared for an app (by its serve spec, or by a loop)."""
    with store() as session:
        rows = session.scalars(select(Campaign.spec).where(Campaign.app == app)).all()
    return [CampaignSpec.model_validate_json(r) for r in rows]


def campaign_base(store: sessionmaker[Session], name: str) -> str:
    campaign_spec(store, name)  # the error for an unknown campaign
    with store() as session:
        return session.get(Campaign, name).base


def campaign_spec(store: sessionmaker[Session], name: str) -> CampaignSpec:
    with store() as session:
        row = session.get(Campaign, name)
        known = session.scalars(select(Campaign.name)).all()
    if row is None:
        raise FeedbackError(
            f"no campaign '{name}' in this store (known: {', '.join(known) or 'none'}); a "
            "campaign is recorded when an app listing it in `campaigns:` starts",
            404,
            "campaign_not_found",
        )
    return CampaignSpec.model_validate_json(row.spec)


def add_annotator(
    store: sessionmaker[Session], name: str, campaign: str, project: str | None = None
) -> str | None:
    """Let key NAME vote in CAMPAIGN; a new annotator key is made (and its secret returned)
    when NAME has none. An existing key must have the annotator scope."""
    with store() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.name == name))
    secret = None
    if key is None:
        secret = create_key(store, name, ["annotator"], project=project or campaign)
    elif "annotator" not in key.scope_set or key.revoked_at is not None:
        raise KeyStoreError(
            f"key '{name}' exists without the annotator scope (or is revoked); choose another "
            "name for the annotator"
        )
    with store.begin() as session:
        stmt = _insert(session)(CampaignAnnotator).values(
            campaign=campaign, key_name=name, added_at=_now()
        )
        session.execute(stmt.on_conflict_do_nothing())
    return secret


def annotator_campaigns(store: sessionmaker[Session], name: str) -> list[str]:
    with store() as session:
        rows = session.scalars(
            select(CampaignAnnotator.campaign).where(CampaignAnnotator.key_name == name)
        )
        return sorted(rows)


# ---- issuing comparisons ----------------------------------------------------------------------


@dataclass
class Issued:
    comparison: Comparison
    answers: dict[str, Answer]
    """Answers the item already has (another annotator's stream, or this one's)."""


def progress(store: sessionmaker[Session], campaign: str, annotator: str) -> int:
    """Comparisons this annotator has voted on in the campaign."""
    with store() as session:
        return session.scalar(
            select(func.count(func.distinct(Vote.comparison_id))).where(
                Vote.campaign == campaign, Vote.annotator == annotator
            )
        )


def held(session: Session, campaign: str, annotator: str) -> tuple[int, int]:
    """(comparisons issued to the annotator in the campaign, of which not voted on)."""
    voted = select(Vote.comparison_id).where(Vote.annotator == annotator)
    mine = select(func.count()).where(
        Comparison.campaign == campaign, Comparison.annotator == annotator
    )
    return session.scalar(mine), session.scalar(mine.where(Comparison.id.not_in(voted)))


def _answers(session: Session, item: str) -> dict[str, Answer]:
    return {a.model: a for a in session.scalars(select(Answer).where(Answer.item == item))}


def pair_counts(store: sessionmaker[Session], campaign: str) -> dict[frozenset, int]:
    with store() as session:
        rows = session.execute(
            select(Comparison.model_a, Comparison.model_b, func.count())
            .where(Comparison.campaign == campaign)
            .group_by(Comparison.model_a, Comparison.model_b)
        ).all()
    counts: Counter = Counter()
    for a, b, n in rows:
        counts[frozenset((a, b))] += n
    return dict(counts)


def issue(
    store: sessionmaker[Session],
    spec: CampaignSpec,
    annotator: str,
    models: list[str],
    fingerprints: dict[str, str | None],
    prompts: list[tuple[str, list[dict]]],
    rng: random.Random,
    ratings: dict[str, float] | None = None,
    custom: list[dict] | None = None,
    round_: int | None = None,
    focus: tuple[str, str, float] | None = None,
    gold: dict[str, tuple[str, str]] | None = None,
) -> Issued | None:
    """The next comparison for an annotator, None when there is none (quota reached or every
    prompt used). A comparison issued and not voted on yet comes back first; then an item
    other annotators saw that still wants overlap; then a new item: the least-used prompt, a
    pair by the campaign's policy, a seed. `custom`: the annotator's own prompt (messages).
    `round_`: the loop round the comparison belongs to (only that round's items are reused);
    `focus`: (model, model, share): that pair is shown in that share of new items; `gold`:
    prompt id -> (its reference answer, a distractor), of which a gold comparison is made in
    the campaign's gold share of the comparisons issued (quality control on). An annotator
    who holds `max_pending` comparisons without a vote gets 429 for a new one; the quota
    counts comparisons issued."""
    same_round = Comparison.round.is_(None) if round_ is None else Comparison.round == round_
    with store() as session:
        voted = select(Vote.comparison_id).where(Vote.annotator == annotator)
        mine = select(Comparison).where(
            Comparison.campaign == spec.name, Comparison.annotator == annotator, same_round
        )
        if custom is None:
            pending = session.scalars(
                mine.where(Comparison.id.not_in(voted)).order_by(Comparison.issued_at)
            ).first()
            if pending is not None:
                return Issued(pending, _answers(session, pending.item))
        issued, unanswered = held(session, spec.name, annotator)
        if unanswered >= spec.max_pending:
            raise FeedbackError(
                f"you hold {unanswered} comparisons without a vote (the campaign allows "
                f"{spec.max_pending}); vote on them before asking for another",
                429,
                "too_many_pending",
            )
        if spec.quota is not None and issued >= spec.quota:
            return None
        # the gold share is of every comparison issued, shared items included
        golden = [p for p in prompts if gold and p[0] in gold] if custom is None else []
        quality = spec.quality
        make_gold = quality.enabled and bool(golden) and rng.random() < quality.gold_share
        template = None
        if custom is None and spec.overlap > 1 and not make_gold:
            seen = select(Comparison.item).where(Comparison.annotator == annotator)
            wanting = (
                select(Comparison.item)
                .where(
                    Comparison.campaign == spec.name,
                    Comparison.item.not_in(seen),
                    same_round,
                    Comparison.gold.is_(None),
                )
                .group_by(Comparison.item)
                .having(func.count(func.distinct(Comparison.annotator)) < spec.overlap)
                .order_by(func.min(Comparison.issued_at))
                .limit(1)
            )
            item = session.scalar(wanting)
            if item is not None:
                template = session.scalars(
                    select(Comparison).where(Comparison.item == item)
                ).first()
        gold_side, gold_texts, coin = None, None, None
        if template is not None:
            prompt_id, prompt, item = template.prompt_id, template.prompt, template.item
            pair = (template.model_a, template.model_b)
            params, seed = template.params, template.seed
            flip = rng.random() >= 0.5
            pair = (pair[1], pair[0]) if flip else pair
            coin = template.swapped != flip  # a self pair's samples change sides instead
        else:
            if custom is not None:
                prompt_id, messages = "custom", custom
            elif make_gold:
                prompt_id, messages = rng.choice(golden)
                gold_texts = gold[prompt_id]
            else:
                used = Counter(
                    dict(
                        session.execute(
                            select(Comparison.prompt_id, func.count(func.distinct(Comparison.item)))
                            .where(Comparison.campaign == spec.name, Comparison.gold.is_(None))
                            .group_by(Comparison.prompt_id)
                        ).all()
                    )
                )
                open_ = [p for p in prompts if used[p[0]] < spec.votes_per_prompt]
                if not open_:
                    return None
                fewest = min(used[p[0]] for p in open_)
                prompt_id, messages = rng.choice([p for p in open_ if used[p[0]] == fewest])
            prompt, item = json.dumps(messages), uuid.uuid4().hex
            if gold_texts is not None:
                pair = GOLD_MODELS if rng.random() < 0.5 else GOLD_MODELS[::-1]
                gold_side = "a" if pair[0] == GOLD_MODELS[0] else "b"
            else:
                counts = pair_counts(store, spec.name) if spec.pairs == "adaptive" else None
                focused = focus is not None and {focus[0], focus[1]} <= set(models)
                if focused and rng.random() < focus[2]:
                    pair = (focus[0], focus[1]) if rng.random() < 0.5 else (focus[1], focus[0])
                elif spec.self_pairs and (len(models) < 2 or rng.random() < spec.self_pairs):
                    model = rng.choice(sorted(models))
                    pair, coin = (model, model), rng.random() < 0.5
                else:
                    pair = choose_pair(models, spec.pairs, rng, counts, ratings)
            params = spec.generation.model_dump_json()
            seed = rng.randrange(2**31)
    # which one went left is the coin: the chooser's order is sorted (a self pair: its first
    # sample on the left unless the coin says otherwise)
    swapped = coin if pair[0] == pair[1] else pair[0] != min(pair)
    comparison = Comparison(
        id=uuid.uuid4().hex, campaign=spec.name, item=item, annotator=annotator,
        prompt_id=prompt_id, prompt=prompt, model_a=pair[0], model_b=pair[1],
        fingerprint_a=fingerprints.get(pair[0]), fingerprint_b=fingerprints.get(pair[1]),
        swapped=swapped, params=params, seed=seed, issued_at=_now(), round=round_,
        gold=gold_side,
    )  # fmt: skip
    with store.begin() as session:
        session.add(comparison)
        if gold_texts is not None:  # its answers are stored with it: shown as stored answers
            for model, text in zip(GOLD_MODELS, gold_texts, strict=True):
                session.add(Answer(
                    item=item, model=model, text=text, finish_reason="stop",
                    completion_tokens=len(text.split()), first_token_ms=None, total_ms=0.0,
                    created_at=_now(),
                ))  # fmt: skip
    with store() as session:
        return Issued(comparison, _answers(session, item))


def comparison_for(store: sessionmaker[Session], comparison_id: str, annotator: str) -> Issued:
    """A comparison issued to this annotator; 404 for any other (unknown or someone else's:
    the two are not told apart)."""
    with store() as session:
        row = session.get(Comparison, comparison_id)
        if row is None or row.annotator != annotator:
            raise FeedbackError(
                f"no comparison '{comparison_id}' was issued to you", 404, "comparison_not_found"
            )
        return Issued(row, _answers(session, row.item))


def store_answer(
    store: sessionmaker[Session], item: str, model: str, out: dict, first_ms, total_ms
) -> None:
    """Keep a model's answer to an item (the first one stored wins)."""
    with store.begin() as session:
        stmt = _insert(session)(Answer).values(
            item=item, model=model, text=out["text"], finish_reason=out["finish_reason"],
            completion_tokens=out["completion_tokens"], first_token_ms=first_ms,
            total_ms=total_ms, created_at=_now(),
        )  # fmt: skip
        session.execute(stmt.on_conflict_do_nothing())


# ---- votes ------------------------------------------------------------------------------------


def vote_json(v: Vote) -> dict:
    out = {f: getattr(v, f) for f in VOTE_FIELDS}
    out["replaces"] = v.replaces or None
    for f in ("prompt", "params", "latency"):
        out[f] = json.loads(out[f])
    for f in ("issued_at", "created_at"):
        out[f] = out[f].isoformat()
    return out


def cast_vote(
    store: sessionmaker[Session],
    annotator: str,
    vote_id: str,
    comparison_id: str,
    verdict: str,
    comment: str | None = None,
    better_answer: str | None = None,
    replaces: str | None = None,
    source: str = "human",
    issued: Issued | None = None,
    reveal: bool = True,
) -> tuple[dict, bool]:
    """Store a vote; (the vote, whether it was a replay). The same vote id again returns
    the stored vote and stores nothing. A correction names the vote it replaces (by the same
    annotator, on the same comparison, the latest of its chain). `issued`: the comparison,
    when the caller has already read it for this annotator. `reveal`: the campaign shows the
    models after a vote, so a correction comes after the reveal: it is stored, marked, and
    never counts."""
    if verdict not in VERDICTS:
        raise FeedbackError(f"verdict '{verdict}': use one of {', '.join(VERDICTS)}", 400)
    with store() as session:
        stored = session.scalar(select(Vote).where(Vote.vote_id == vote_id))
    if stored is not None:
        return _replay(stored, annotator)
    if issued is None or issued.comparison.id != comparison_id:
        issued = comparison_for(store, comparison_id, annotator)
    c = issued.comparison
    slot_a, slot_b = answer_slots(c.model_a, c.model_b, c.swapped)
    missing = [m for m in (slot_a, slot_b) if m not in issued.answers]
    if missing:
        raise FeedbackError(
            f"comparison '{comparison_id}' has no stored answer from both models yet; vote "
            "once both answers are shown",
            409,
            "answers_pending",
        )
    if replaces:
        with store() as session:
            old = session.scalar(select(Vote).where(Vote.vote_id == replaces))
        if old is None or old.annotator != annotator or old.comparison_id != comparison_id:
            raise FeedbackError(
                f"replaces: no vote '{replaces}' of yours on this comparison", 404, "vote_not_found"
            )
    a, b = issued.answers[slot_a], issued.answers[slot_b]
    now = _now()
    issued_at = c.issued_at if c.issued_at.tzinfo else c.issued_at.replace(tzinfo=UTC)
    latency = {
        "a": {"first_token_ms": a.first_token_ms, "total_ms": a.total_ms},
        "b": {"first_token_ms": b.first_token_ms, "total_ms": b.total_ms},
        "issue_to_vote_ms": round((now - issued_at).total_seconds() * 1000, 1),
    }
    row = dict(
        vote_id=vote_id, comparison_id=comparison_id, replaces=replaces or "",
        campaign=c.campaign, annotator=annotator, verdict=verdict, source=source, comment=comment,
        better_answer=better_answer, prompt=c.prompt, response_a=a.text, response_b=b.text,
        model_a=c.model_a, model_b=c.model_b, fingerprint_a=c.fingerprint_a,
        fingerprint_b=c.fingerprint_b, swapped=c.swapped, params=c.params, seed=c.seed,
        latency=json.dumps(latency), gold=c.gold, after_reveal=bool(replaces) and reveal,
        issued_at=issued_at, created_at=now,
    )  # fmt: skip
    with store.begin() as session:
        stmt = _insert(session)(Vote).values(**row).on_conflict_do_nothing().returning(Vote.id)
        inserted = session.execute(stmt).scalar()
        closed = c.round is not None and not check_round_open(session, c.campaign, c.round)
        if inserted is not None and closed:
            raise FeedbackError(  # leaving the block rolls the insert back
                f"round {c.round} of campaign '{c.campaign}' is closed: its votes are "
                "counted and the loop has moved on; ask for the next comparison",
                409,
                "round_closed",
            )
    with store() as session:
        stored = session.scalar(select(Vote).where(Vote.vote_id == vote_id))
    if inserted is None:
        if stored is not None:  # the same id raced in from a second request
            return _replay(stored, annotator)
        what = f"vote '{replaces}' was already corrected" if replaces else "you already voted"
        raise FeedbackError(
            f"{what} on comparison '{comparison_id}'; to change a vote, send a new vote_id "
            "with replaces naming the latest one",
            409,
            "already_voted",
        )
    return vote_json(stored), False


def _replay(stored: Vote, annotator: str) -> tuple[dict, bool]:
    if stored.annotator != annotator:  # never tell one annotator about another's votes
        raise FeedbackError("vote_id is taken; generate a new one (a UUID)", 409, "vote_id_taken")
    return vote_json(stored), True


def effective_votes(
    store: sessionmaker[Session], campaign: str, source: str | None = None
) -> list[Vote]:
    """The votes that count: the latest of each correction chain, oldest first; `source`:
    only human or only simulated annotators' votes."""
    with store() as session:
        query = select(Vote).where(Vote.campaign == campaign, counted(campaign))
        if source is not None:
            query = query.where(Vote.source == source)
        return list(session.scalars(query.order_by(Vote.id)))


def effective_rows(
    store: sessionmaker[Session], campaign: str, source: str | None = None
) -> tuple[list[dict], dict[str, str]]:
    """The campaign's votes that count (`effective_votes`, as `vote_json` rows, gold ones
    among them) and their comparisons' items: what quality control and the ratings read."""
    rows = [vote_json(v) for v in effective_votes(store, campaign, source)]
    return rows, items_of(store, [v["comparison_id"] for v in rows])


def items_of(store: sessionmaker[Session], comparison_ids: list[str]) -> dict[str, str]:
    """comparison id -> item."""
    with store() as session:
        rows = session.execute(
            select(Comparison.id, Comparison.item).where(Comparison.id.in_(comparison_ids))
        ).all()
    return dict(rows)


# ---- backup, restore, forget --------------------------------------------------------------


def dump(store: sessionmaker[Session], campaign: str) -> list[dict]:
    """Every row of a campaign as JSON lines: the campaign, its annotators, comparisons,
    answers and votes (all of them, corrections included)."""

    def row(obj) -> dict:
        out = {}
        for col in obj.__table__.columns:
            value = getattr(obj, col.key)
            out[col.key] = value.isoformat() if isinstance(value, datetime) else value
        return out

    with store() as session:
        head = session.get(Campaign, campaign)
        if head is None:
            raise FeedbackError(f"no campaign '{campaign}' in this store", 404)
        comparisons = session.scalars(select(Comparison).where(Comparison.campaign == campaign))
        comparisons = list(comparisons)
        items = sorted({c.item for c in comparisons})
        lines = [{"table": "campaigns", "row": row(head)}]
        for table, rows in [
            ("campaign_annotators", session.scalars(
                select(CampaignAnnotator).where(CampaignAnnotator.campaign == campaign))),
            ("comparisons", comparisons),
            ("answers", session.scalars(select(Answer).where(Answer.item.in_(items)))),
            ("votes", session.scalars(
                select(Vote).where(Vote.campaign == campaign).order_by(Vote.id))),
        ]:  # fmt: skip
            lines += [{"table": table, "row": row(r)} for r in rows]
    return lines


TABLES = {
    "campaigns": Campaign, "campaign_annotators": CampaignAnnotator,
    "comparisons": Comparison, "answers": Answer, "votes": Vote,
}  # fmt: skip


def load(store: sessionmaker[Session], lines: list[dict], source: str = "dump") -> Counter:
    """Restore a dump: rows already present are kept as they are (a restore never changes
    stored rows), the others inserted. Counts of inserted rows per table."""
    inserted: Counter = Counter()
    with store.begin() as session:
        for n, line in enumerate(lines, 1):
            table = TABLES.get(line.get("table"))
            if table is None or not isinstance(line.get("row"), dict):
                raise FeedbackError(
                    f"{source}:{n}: not a dump line (want {{'table': one of "
                    f"{', '.join(TABLES)}, 'row': {{...}}}})"
                )
            values = dict(line["row"])
            for col in table.__table__.columns:
                if isinstance(col.type, type(Campaign.declared_at.type)) and values.get(col.key):
                    values[col.key] = datetime.fromisoformat(values[col.key])
            if table is Vote:
                values.pop("id", None)
            stmt = _insert(session)(table).values(**values).on_conflict_do_nothing()
            if session.execute(stmt.returning(*table.__table__.primary_key.columns)).first():
                inserted[line["table"]] += 1
    return inserted


def forget(store: sessionmaker[Session], annotator: str) -> dict[str, int]:
    """Delete one person's votes, comments, comparisons (their typed prompts among them),
    page sessions and campaign memberships; answers no other comparison uses go too."""
    with store.begin() as session:
        comments = session.scalar(
            select(func.count()).where(
                Vote.annotator == annotator,
                (Vote.comment.is_not(None)) | (Vote.better_answer.is_not(None)),
            )
        )
        votes = session.execute(delete(Vote).where(Vote.annotator == annotator)).rowcount
        items = set(
            session.scalars(select(Comparison.item).where(Comparison.annotator == annotator))
        )
        comparisons = session.execute(
            delete(Comparison).where(Comparison.annotator == annotator)
        ).rowcount
        still = set(session.scalars(select(Comparison.item).where(Comparison.item.in_(items))))
        answers = session.execute(delete(Answer).where(Answer.item.in_(items - still))).rowcount
        key = session.scalar(select(ApiKey).where(ApiKey.name == annotator))
        sessions = 0
        if key is not None:
            sessions = session.execute(
                delete(WebSession).where(WebSession.key_id == key.id)
            ).rowcount
        memberships = session.execute(
            delete(CampaignAnnotator).where(CampaignAnnotator.key_name == annotator)
        ).rowcount
    return {"votes": votes, "comments": comments, "comparisons": comparisons,
            "answers": answers, "sessions": sessions, "memberships": memberships}  # fmt: skip


def new_vote_id() -> str:
    return secrets.token_hex(16)
