"""The fine-tuning API: files, jobs and their events.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("project", sa.String(100), nullable=False, index=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(40), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("location", sa.Text, nullable=False),
        sa.Column("format", sa.String(40), nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("kinds", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("project", sa.String(100), nullable=False, index=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("training_file", sa.String(40), nullable=False),
        sa.Column("validation_file", sa.String(40)),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("suffix", sa.String(64)),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("job_metadata", sa.Text, nullable=False, server_default="{}"),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("spec_location", sa.Text, nullable=False),
        sa.Column("run", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("submission", sa.String(100)),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("wanted", sa.String(20)),
        sa.Column("fine_tuned_model", sa.String(200)),
        sa.Column("trained_tokens", sa.BigInteger),
        sa.Column("error", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("finished_at", TZ),
    )
    op.create_table(
        "fine_tuning_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job", sa.String(40), nullable=False, index=True),
        sa.Column("level", sa.String(10), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fine_tuning_events")
    op.drop_table("fine_tuning_jobs")
    op.drop_table("files")
