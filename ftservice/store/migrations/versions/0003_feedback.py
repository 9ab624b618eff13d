"""Preference collection: campaigns, annotators, page sessions, comparisons, answers, votes.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("app", sa.String(100), nullable=False),
        sa.Column("base", sa.String(200), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("declared_at", TZ, nullable=False),
    )
    op.create_table(
        "campaign_annotators",
        sa.Column("campaign", sa.String(100), primary_key=True),
        sa.Column("key_name", sa.String(100), primary_key=True),
        sa.Column("added_at", TZ, nullable=False),
    )
    op.create_table(
        "web_sessions",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column(
            "key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
    )
    op.create_table(
        "comparisons",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("campaign", sa.String(100), nullable=False, index=True),
        sa.Column("item", sa.String(32), nullable=False, index=True),
        sa.Column("annotator", sa.String(100), nullable=False, index=True),
        sa.Column("prompt_id", sa.String(200), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("model_a", sa.String(100), nullable=False),
        sa.Column("model_b", sa.String(100), nullable=False),
        sa.Column("fingerprint_a", sa.String(100)),
        sa.Column("fingerprint_b", sa.String(100)),
        sa.Column("swapped", sa.Boolean, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("issued_at", TZ, nullable=False),
    )
    op.create_table(
        "answers",
        sa.Column("item", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(100), primary_key=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("finish_reason", sa.String(20), nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("first_token_ms", sa.Float),
        sa.Column("total_ms", sa.Float, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("vote_id", sa.String(64), nullable=False, unique=True),
        sa.Column(
            "comparison_id",
            sa.String(32),
            sa.ForeignKey("comparisons.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("replaces", sa.String(64), nullable=False),
        sa.Column("campaign", sa.String(100), nullable=False, index=True),
        sa.Column("annotator", sa.String(100), nullable=False, index=True),
        sa.Column("verdict", sa.String(10), nullable=False),
        sa.Column("source", sa.String(20), nullable=False, server_default="human"),
        sa.Column("comment", sa.Text),
        sa.Column("better_answer", sa.Text),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("response_a", sa.Text, nullable=False),
        sa.Column("response_b", sa.Text, nullable=False),
        sa.Column("model_a", sa.String(100), nullable=False),
        sa.Column("model_b", sa.String(100), nullable=False),
        sa.Column("fingerprint_a", sa.String(100)),
        sa.Column("fingerprint_b", sa.String(100)),
        sa.Column("swapped", sa.Boolean, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("latency", sa.Text, nullable=False),
        sa.Column("issued_at", TZ, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("comparison_id", "replaces"),
    )


def downgrade() -> None:
    for table in (
        "votes", "answers", "comparisons", "web_sessions", "campaign_annotators", "campaigns"
    ):  # fmt: skip
        op.drop_table(table)
