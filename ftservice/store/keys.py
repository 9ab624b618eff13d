"""API keys, one model for the whole service: serving, the feedback page and the jobs API
all authenticate with these. A key is shown once, when made; the store keeps its sha256."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from ftservice.errors import FtserviceError
from ftservice.store.models import ApiKey, RateWindow, WebSession

SCOPES = ("inference", "admin", "annotator", "jobs")
KEY_PREFIX = "fts-"
ENV_KEYS = "FTSERVICE_API_KEYS"
"""Comma-separated keys accepted as inference + admin keys (the embedded default)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class KeyStoreError(FtserviceError):
    """A key that cannot be made, found or revoked."""


@dataclass(frozen=True)
class Caller:
    """Who a request comes from."""

    name: str
    scopes: frozenset[str]
    project: str
    key_id: int | None
    """None for a key from FTSERVICE_API_KEYS (not in the store)."""
    requests_per_minute: int | None = None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    store: sessionmaker[Session],
    name: str,
    scopes: list[str],
    project: str = "default",
    requests_per_minute: int | None = None,
) -> str:
    """A new key; returns the secret, which is never stored or shown again."""
    if not _NAME.match(name):
        raise KeyStoreError(f"key name '{name}': use letters, digits, '.', '_' or '-' (1-100)")
    bad = sorted(set(scopes) - set(SCOPES))
    if bad or not scopes:
        raise KeyStoreError(
            f"scopes {', '.join(bad) or '(none)'}: give one or more of {', '.join(SCOPES)}"
        )
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with store.begin() as session:
        if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
            raise KeyStoreError(f"a key named '{name}' exists; revoke it or choose another name")
        session.add(
            ApiKey(
                name=name, prefix=secret[:8], digest=digest(secret),
                scopes=",".join(s for s in SCOPES if s in scopes), project=project,
                requests_per_minute=requests_per_minute,
                created_at=datetime.now(UTC), requests=0, prompt_tokens=0, completion_tokens=0,
            )
        )  # fmt: skip
    return secret


def list_keys(store: sessionmaker[Session]) -> list[dict]:
    with store() as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.id)).all()
    return [
        {"name": k.name, "prefix": k.prefix, "scopes": k.scopes, "project": k.project,
         "state": "revoked" if k.revoked_at else "active", "requests": k.requests,
         "prompt_tokens": k.prompt_tokens, "completion_tokens": k.completion_tokens,
         "created": k.created_at.isoformat(timespec="seconds"),
         "last_used": k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "-"}
        for k in rows
    ]  # fmt: skip


def revoke_key(store: sessionmaker[Session], name: str) -> None:
    with store.begin() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.name == name))
        if key is None:
            raise KeyStoreError(f"no key named '{name}'; `ftservice keys list` shows them")
        if key.revoked_at is None:
            key.revoked_at = datetime.now(UTC)


def authenticate(store: sessionmaker[Session], secret: str) -> Caller | None:
    """The caller a key belongs to; None for an unknown or revoked key."""
    env = [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    if any(secrets.compare_digest(secret, k) for k in env):
        return Caller("env", frozenset({"inference", "admin"}), "default", None)
    with store() as session:
        key = session.scalar(
            select(ApiKey).where(ApiKey.digest == digest(secret), ApiKey.revoked_at.is_(None))
        )
    if key is None:
        return None
    return Caller(key.name, frozenset(key.scope_set), key.project, key.id,
                  key.requests_per_minute)  # fmt: skip


def record_usage(
    store: sessionmaker[Session], caller: Caller, prompt_tokens: int, completion_tokens: int
) -> None:
    if caller.key_id is None:
        return
    with store.begin() as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == caller.key_id)
            .values(
                requests=ApiKey.requests + 1,
                prompt_tokens=ApiKey.prompt_tokens + prompt_tokens,
                completion_tokens=ApiKey.completion_tokens + completion_tokens,
                last_used_at=datetime.now(UTC),
            )
        )


def take_request(store: sessionmaker[Session], caller: Caller, per_minute: int) -> float | None:
    """Count one request against the caller's per-minute limit; None if allowed, else the
    seconds until the next minute (Retry-After). Every ingress replica shares the count."""
    if caller.key_id is None:
        return None
    now = time.time()
    minute = int(now // 60)
    with store.begin() as session:
        dialect = session.get_bind().dialect.name
        insert = (postgresql if dialect == "postgresql" else sqlite).insert
        stmt = insert(RateWindow).values(key_id=caller.key_id, minute=minute, count=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=["key_id", "minute"], set_={"count": RateWindow.count + 1}
        ).returning(RateWindow.count)
        count = session.execute(stmt).scalar_one()
        session.query(RateWindow).filter(
            RateWindow.key_id == caller.key_id, RateWindow.minute < minute
        ).delete()
    if count > per_minute:
        return max(1.0, (minute + 1) * 60 - now)
    return None


SESSION_HOURS = 12


def open_session(store: sessionmaker[Session], caller: Caller) -> tuple[str, str]:
    """A page session for a stored key: (cookie value, CSRF token). Only the cookie's sha256
    is stored."""
    if caller.key_id is None:
        raise KeyStoreError("keys from FTSERVICE_API_KEYS cannot sign in to the page")
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    now = datetime.now(UTC)
    with store.begin() as session:
        session.add(
            WebSession(digest=digest(cookie), key_id=caller.key_id, csrf=csrf, created_at=now,
                       expires_at=now + timedelta(hours=SESSION_HOURS))
        )  # fmt: skip
    return cookie, csrf


def session_caller(store: sessionmaker[Session], cookie: str) -> tuple[Caller, str] | None:
    """The caller and CSRF token of a live page session; None when unknown, expired or its
    key revoked."""
    with store() as session:
        row = session.execute(
            select(WebSession, ApiKey)
            .join(ApiKey, ApiKey.id == WebSession.key_id)
            .where(WebSession.digest == digest(cookie), ApiKey.revoked_at.is_(None))
        ).first()
    if row is None:
        return None
    web, key = row
    expires = web.expires_at if web.expires_at.tzinfo else web.expires_at.replace(tzinfo=UTC)
    if expires < datetime.now(UTC):
        return None
    caller = Caller(key.name, frozenset(key.scope_set), key.project, key.id,
                    key.requests_per_minute)  # fmt: skip
    return caller, web.csrf


def close_session(store: sessionmaker[Session], cookie: str) -> None:
    with store.begin() as session:
        session.execute(delete(WebSession).where(WebSession.digest == digest(cookie)))
