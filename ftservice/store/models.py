"""The store's tables (the schema itself is made by the migrations)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
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


# ---- preference collection (the feedback issue): inserted, never updated -------------------


class Campaign(Base):
    """A campaign as the app serving it last declared it (its spec as JSON)."""

    __tablename__ = "campaigns"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    app: Mapped[str] = mapped_column(String(100))
    base: Mapped[str] = mapped_column(String(200))
    """The base's name on the app's API (the leaderboard centres on it)."""
    spec: Mapped[str] = mapped_column(Text)
    declared_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CampaignAnnotator(Base):
    """A key (with the annotator scope) that may vote in a campaign."""

    __tablename__ = "campaign_annotators"

    campaign: Mapped[str] = mapped_column(String(100), primary_key=True)
    key_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A signed-in page: the cookie's sha256, its key and the CSRF token posts must carry."""

    __tablename__ = "web_sessions"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Comparison(Base):
    """One comparison the server issued to one annotator: a prompt, two models shown as A
    (left) and B (right), the generation parameters and seed. Annotators who overlap on an
    item (the same prompt, pair and seed) each get a comparison of their own."""

    __tablename__ = "comparisons"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    campaign: Mapped[str] = mapped_column(String(100), index=True)
    item: Mapped[str] = mapped_column(String(32), index=True)
    annotator: Mapped[str] = mapped_column(String(100), index=True)
    prompt_id: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    """The chat messages, as JSON."""
    model_a: Mapped[str] = mapped_column(String(100))
    model_b: Mapped[str] = mapped_column(String(100))
    fingerprint_a: Mapped[str | None] = mapped_column(String(100))
    fingerprint_b: Mapped[str | None] = mapped_column(String(100))
    swapped: Mapped[bool] = mapped_column(Boolean)
    """The pair chooser's first model was put on the right (the coin of this comparison)."""
    params: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    round: Mapped[int | None] = mapped_column(Integer)
    """The loop round it was issued in (None outside a loop)."""
    gold: Mapped[str | None] = mapped_column(String(1), default=None)
    """A gold comparison's side ('a' or 'b') that states the prompt's reference answer (the
    other side states another fact); None for a comparison of two models."""


class Answer(Base):
    """A model's answer to an item (shared by the comparisons of that item)."""

    __tablename__ = "answers"

    item: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(20))
    completion_tokens: Mapped[int] = mapped_column(Integer)
    first_token_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Vote(Base):
    """A vote, with everything it was about copied in: rows are never updated in place. A
    correction is a new row naming the vote it replaces; the latest of a chain counts."""

    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("comparison_id", "replaces"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vote_id: Mapped[str] = mapped_column(String(64), unique=True)
    """The client's id: the same id again is a replay, answered with the stored vote."""
    comparison_id: Mapped[str] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"))
    replaces: Mapped[str] = mapped_column(String(64))
    """The vote id this one corrects; '' for a first vote (one per comparison)."""
    campaign: Mapped[str] = mapped_column(String(100), index=True)
    annotator: Mapped[str] = mapped_column(String(100), index=True)
    verdict: Mapped[str] = mapped_column(String(10))
    """a (left), b (right), tie or both_bad."""
    source: Mapped[str] = mapped_column(String(20))
    """human, or simulated (a key of the project `simulated`, as `feedback simulate` makes)."""
    comment: Mapped[str | None] = mapped_column(Text)
    better_answer: Mapped[str | None] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    model_a: Mapped[str] = mapped_column(String(100))
    model_b: Mapped[str] = mapped_column(String(100))
    fingerprint_a: Mapped[str | None] = mapped_column(String(100))
    fingerprint_b: Mapped[str | None] = mapped_column(String(100))
    swapped: Mapped[bool] = mapped_column(Boolean)
    params: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    latency: Mapped[str] = mapped_column(Text)
    """JSON: each answer's first-token and total ms, and the ms from issue to vote."""
    gold: Mapped[str | None] = mapped_column(String(1), default=None)
    """The comparison's gold side (a or b), None for a comparison of two models."""
    after_reveal: Mapped[bool] = mapped_column(Boolean, default=False)
    """A correction sent after the vote it corrects revealed the models: stored, never
    counted (the vote it names still counts)."""
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Loop(Base):
    """A closed loop run (`ftservice loop run`): its spec and where it stands."""

    __tablename__ = "loops"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    app: Mapped[str] = mapped_column(String(100))
    campaign: Mapped[str] = mapped_column(String(100))
    spec: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20))
    """running, or finished."""
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LoopRound(Base):
    """One round of a loop: the models its comparisons pit against each other, its vote
    quota, and each phase's outcome. The page issues comparisons of a campaign's open round
    only; a closed round takes no more votes."""

    __tablename__ = "loop_rounds"

    loop: Mapped[str] = mapped_column(String(100), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign: Mapped[str] = mapped_column(String(100), index=True)
    models: Mapped[str] = mapped_column(Text)
    """JSON list of the models that compete in this round."""
    focus: Mapped[str | None] = mapped_column(Text)
    """JSON [challenger, parent, share]: the pair a share of the comparisons goes to."""
    quota: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(20))
    """voting, closed, trained (a challenger is published and served), done."""
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    votes: Mapped[int | None] = mapped_column(Integer)
    leader: Mapped[str | None] = mapped_column(String(100))
    challenger: Mapped[str | None] = mapped_column(String(100))
    details: Mapped[str] = mapped_column(Text, default="{}")
    """JSON: the round's ratings, export, training, held-out judgement and decision."""


class AliasEvent(Base):
    """A change of a stable model alias (`production`) with its evidence; the latest row of
    an (app, alias) is where the alias points now. Rows are never updated."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    app: Mapped[str] = mapped_column(String(100), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(20))
    """create, canary, promote, rollback, inconclusive, refused."""
    target: Mapped[str] = mapped_column(String(100))
    canary: Mapped[str | None] = mapped_column(String(100))
    canary_share: Mapped[float] = mapped_column(Float, default=0.0)
    subject: Mapped[str | None] = mapped_column(String(100))
    """The adapter the decision was about."""
    loop: Mapped[str | None] = mapped_column(String(100))
    round: Mapped[int | None] = mapped_column(Integer)
    evidence: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StoredFile(Base):
    """A file uploaded for fine-tuning (`POST /v1/files`), checked record by record at
    upload; it belongs to its key's project and no other project sees it."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    """file-<24 hex>."""
    project: Mapped[str] = mapped_column(String(100), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(BigInteger)
    location: Mapped[str] = mapped_column(Text)
    """Where its bytes are: a path or URI under the jobs' file storage."""
    format: Mapped[str] = mapped_column(String(40))
    """The data format our loaders recognised (alpaca, openai, openai_dpo, ...)."""
    records: Mapped[int] = mapped_column(Integer)
    kinds: Mapped[str] = mapped_column(String(200))
    """What its records are: chat, preference, ... with counts."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FineTuneJob(Base):
    """A fine-tuning job of the API (`POST /v1/fine_tuning/jobs`): the request, the job
    spec it resolved to, and the Ray Job that runs it. Its status is refreshed from Ray
    Jobs when read, so an API that restarts loses nothing."""

    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    """ftjob-<24 hex>."""
    project: Mapped[str] = mapped_column(String(100), index=True)
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    method: Mapped[str] = mapped_column(Text)
    """JSON: OpenAI's method object as resolved (type and hyperparameters)."""
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    job_metadata: Mapped[str] = mapped_column(Text, default="{}")
    """JSON: the request's metadata (16 string pairs at most)."""
    spec: Mapped[str] = mapped_column(Text)
    """JSON: the resolved job spec the run trains."""
    spec_location: Mapped[str] = mapped_column(Text)
    run: Mapped[str] = mapped_column(Text)
    """The run's folder (checkpoints, live events)."""
    status: Mapped[str] = mapped_column(String(20), index=True)
    """validating_files, queued, running, succeeded, failed, cancelled, paused."""
    submission: Mapped[str | None] = mapped_column(String(100))
    """The Ray Job of its latest attempt (a resumed job is a new attempt)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    wanted: Mapped[str | None] = mapped_column(String(20))
    """What a stop asked for, until Ray confirms it: cancelled or paused."""
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    """JSON: {code, message, param} of a failed job."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    """A status change or message of a fine-tuning job (its logged steps are read from the
    run's events file)."""

    __tablename__ = "fine_tuning_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(40), index=True)
    level: Mapped[str] = mapped_column(String(10))
    """info, warn, error."""
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
