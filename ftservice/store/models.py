"""The store's tables (the schema itself is made by the migrations)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    """The key's first characters, to tell keys apart in lists; never the whole key."""
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 of the key: keys are 256 random bits, so a fast hash cannot be brute-forced."""
    scopes: Mapped[str] = mapped_column(String(200))
    """Comma-separated: inference, admin, annotator, jobs."""
    project: Mapped[str] = mapped_column(String(100))
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    """This key's own rate limit; unset: the app's."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)

    @property
    def scope_set(self) -> set[str]:
        return set(self.scopes.split(","))


class RateWindow(Base):
    """Requests of one key in one minute: a fixed-window rate limit every ingress shares."""

    __tablename__ = "rate_windows"

    key_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class DisabledAdapter(Base):
    """An adapter an admin took out of one app's service (unload_lora_adapter)."""

    __tablename__ = "disabled_adapters"

    app: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    disabled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    by_key: Mapped[str] = mapped_column(String(100))
