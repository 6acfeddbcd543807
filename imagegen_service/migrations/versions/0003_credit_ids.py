"""Caller-supplied credit ids, which make a credit safe to retry; indexes for paging.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credits",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("amount_micros", sa.BigInteger, nullable=False),
        sa.Column("entry_id", sa.BigInteger, sa.ForeignKey("ledger_entries.id"), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_credits_entry_id", "credits", ["entry_id"], unique=True)
    op.create_index("ix_accounts_created_at", "accounts", ["created_at", "id"])
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_api_keys_account_id", "api_keys")
    op.drop_index("ix_accounts_created_at", "accounts")
    op.drop_index("ix_credits_entry_id", "credits")
    op.drop_table("credits")
