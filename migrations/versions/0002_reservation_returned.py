"""Reservations can be `returned`: a refunded sale puts its units back on hand.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_reservations_status", "reservations", type_="check")
    op.create_check_constraint(
        "ck_reservations_status",
        "reservations",
        "status IN ('active', 'committed', 'released', 'returned')",
    )


def downgrade() -> None:
    op.execute("UPDATE reservations SET status = 'committed' WHERE status = 'returned'")
    op.drop_constraint("ck_reservations_status", "reservations", type_="check")
    op.create_check_constraint(
        "ck_reservations_status",
        "reservations",
        "status IN ('active', 'committed', 'released')",
    )
