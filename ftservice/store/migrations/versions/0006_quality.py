"""Quality control of a campaign's votes: gold comparisons (the side with the known better
answer) and corrections made after the models were revealed.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("comparisons", sa.Column("gold", sa.String(1), nullable=True))
    op.add_column("votes", sa.Column("gold", sa.String(1), nullable=True))
    op.add_column(
        "votes",
        sa.Column("after_reveal", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_column("votes", "after_reveal")
    op.drop_column("votes", "gold")
    op.drop_column("comparisons", "gold")
