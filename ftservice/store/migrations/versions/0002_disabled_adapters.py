"""Adapters taken out of service by an admin (unload_lora_adapter) until loaded again.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "disabled_adapters",
        sa.Column("app", sa.String(100), primary_key=True),
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("by_key", sa.String(100), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("disabled_adapters")
