"""Loop rounds and model aliases in the store.

A loop runs in one campaign; each round names the models its comparisons pit against each
other and how many votes it takes. The page issues comparisons of a campaign's open round
only and refuses votes once the round is closed, so the votes of a round are exactly those
stored before it closed. An alias (`production`) is a name on the API that points at an
adapter, with a share of its traffic going to a canary; every change is a row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ftservice.store.models import AliasEvent, Comparison, LoopRound, Vote

ALIAS_ACTIONS = ("create", "canary", "promote", "rollback", "inconclusive", "refused")


def _now() -> datetime:
    return datetime.now(UTC)


# ---- rounds ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenRound:
    """What the page needs of a campaign's latest round."""

    round: int
    phase: str
    models: list[str]
    quota: int
    focus: tuple[str, str, float] | None


def latest_round(store: sessionmaker[Session], campaign: str) -> OpenRound | None:
    """The campaign's latest loop round; None for a campaign no loop runs in."""
    with store() as session:
        row = session.scalars(
            select(LoopRound).where(LoopRound.campaign == campaign).order_by(LoopRound.round.desc())
        ).first()
    if row is None:
        return None
    focus = json.loads(row.focus) if row.focus else None
    return OpenRound(
        row.round,
        "voting" if row.closed_at is None else row.phase,
        json.loads(row.models),
        row.quota,
        tuple(focus) if focus else None,
    )


def round_vote_count(store: sessionmaker[Session], campaign: str, round_: int) -> int:
    """Comparisons of two models in the round that have a vote (a corrected vote counts
    once; gold comparisons, which check the annotators, do not count)."""
    with store() as session:
        return session.scalar(
            select(func.count(func.distinct(Vote.comparison_id)))
            .join(Comparison, Comparison.id == Vote.comparison_id)
            .where(
                Comparison.campaign == campaign,
                Comparison.round == round_,
                Comparison.gold.is_(None),
            )
        )


def counted(campaign: str):
    """The condition a vote of the campaign counts by: the latest of its correction chain,
    where a correction sent after the reveal neither counts nor displaces the vote it names."""
    corrected = select(Vote.replaces).where(
        Vote.replaces != "", Vote.campaign == campaign, Vote.after_reveal.is_(False)
    )
    return Vote.vote_id.not_in(corrected) & Vote.after_reveal.is_(False)


def round_votes(store: sessionmaker[Session], campaign: str, round_: int) -> list[Vote]:
    """The round's votes that count (the latest of each correction chain, gold comparisons
    among them), oldest first."""
    with store() as session:
        in_round = select(Comparison.id).where(
            Comparison.campaign == campaign, Comparison.round == round_
        )
        query = select(Vote).where(Vote.comparison_id.in_(in_round), counted(campaign))
        return list(session.scalars(query.order_by(Vote.id)))


def check_round_open(session: Session, campaign: str, round_: int) -> bool:
    """Inside a vote's transaction, after its insert: whether its round still takes votes.
    On PostgreSQL the round's row is share-locked, so a close waits for this vote to commit
    (and then counts it); on SQLite the insert already holds the write lock."""
    query = select(LoopRound.closed_at).where(
        LoopRound.campaign == campaign, LoopRound.round == round_
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    row = session.execute(query).first()
    return row is not None and row[0] is None


# ---- aliases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasState:
    target: str
    canary: str | None
    canary_share: float


def alias_state(store: sessionmaker[Session], app: str, alias: str) -> AliasState | None:
    with store() as session:
        row = session.scalars(
            select(AliasEvent)
            .where(AliasEvent.app == app, AliasEvent.alias == alias)
            .order_by(AliasEvent.id.desc())
        ).first()
    if row is None:
        return None
    return AliasState(row.target, row.canary, row.canary_share if row.canary else 0.0)


def aliases(store: sessionmaker[Session], app: str) -> dict[str, AliasState]:
    """Every alias of the app, as it points now (its latest row), in one query."""
    with store() as session:
        rows = session.scalars(
            select(AliasEvent).where(AliasEvent.app == app).order_by(AliasEvent.id)
        ).all()
    return {
        r.alias: AliasState(r.target, r.canary, r.canary_share if r.canary else 0.0) for r in rows
    }


def record_alias(
    store: sessionmaker[Session],
    app: str,
    alias: str,
    action: str,
    target: str,
    evidence: dict,
    canary: str | None = None,
    canary_share: float = 0.0,
    subject: str | None = None,
    loop: str | None = None,
    round_: int | None = None,
) -> dict:
    if action not in ALIAS_ACTIONS:
        raise ValueError(f"alias action '{action}': one of {', '.join(ALIAS_ACTIONS)}")
    row = AliasEvent(
        app=app, alias=alias, action=action, target=target, canary=canary,
        canary_share=canary_share if canary else 0.0, subject=subject, loop=loop, round=round_,
        evidence=json.dumps(evidence, sort_keys=True), at=_now(),
    )  # fmt: skip
    with store.begin() as session:
        session.add(row)
        session.flush()
        return alias_json(row)


def alias_json(row: AliasEvent) -> dict:
    return {
        "id": row.id,
        "app": row.app,
        "alias": row.alias,
        "action": row.action,
        "target": row.target,
        "canary": row.canary,
        "canary_share": row.canary_share,
        "subject": row.subject,
        "loop": row.loop,
        "round": row.round,
        "evidence": json.loads(row.evidence),
        "at": row.at.isoformat(),
    }


def alias_history(store: sessionmaker[Session], app: str | None = None) -> list[dict]:
    """Every alias change, oldest first (of one app, or all)."""
    with store() as session:
        query = select(AliasEvent).order_by(AliasEvent.id)
        if app is not None:
            query = query.where(AliasEvent.app == app)
        return [alias_json(r) for r in session.scalars(query)]
