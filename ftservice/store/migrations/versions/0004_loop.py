"""The closed loop: loops and their rounds, a comparison's round, and alias events.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "loops",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("app", sa.String(100), nullable=False),
        sa.Column("campaign", sa.String(100), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("finished_at", TZ),
    )
    op.create_table(
        "loop_rounds",
        sa.Column("loop", sa.String(100), primary_key=True),
        sa.Column("round", sa.Integer, primary_key=True),
        sa.Column("campaign", sa.String(100), nullable=False, index=True),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("focus", sa.Text),
        sa.Column("quota", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(20), nullable=False),
        sa.Column("opened_at", TZ, nullable=False),
        sa.Column("closed_at", TZ),
        sa.Column("votes", sa.Integer),
        sa.Column("leader", sa.String(100)),
        sa.Column("challenger", sa.String(100)),
        sa.Column("details", sa.Text, nullable=False, server_default="{}"),
    )
    with op.batch_alter_table("comparisons") as batch:
        batch.add_column(sa.Column("round", sa.Integer))
    op.create_table(
        "alias_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("app", sa.String(100), nullable=False, index=True),
        sa.Column("alias", sa.String(100), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("target", sa.String(100), nullable=False),
        sa.Column("canary", sa.String(100)),
        sa.Column("canary_share", sa.Float, nullable=False, server_default="0"),
        sa.Column("subject", sa.String(100)),
        sa.Column("loop", sa.String(100)),
        sa.Column("round", sa.Integer),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("alias_events")
    with op.batch_alter_table("comparisons") as batch:
        batch.drop_column("round")
    op.drop_table("loop_rounds")
    op.drop_table("loops")
