"""The database schema, shared by the SQLite and PostgreSQL backends and by the migrations."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    # Micro-dollars. available + held is the balance; the ledger sums to both.
    sa.Column("available_micros", sa.BigInteger, nullable=False),
    sa.Column("held_micros", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.CheckConstraint("available_micros >= 0", name="ck_accounts_available_nonnegative"),
    sa.CheckConstraint("held_micros >= 0", name="ck_accounts_held_nonnegative"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
    # SHA-256 of the secret, hex. The secret itself is never stored.
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    # Overrides of the configured rate limits; NULL means the default.
    sa.Column("requests_per_minute", sa.Integer, nullable=True),
    sa.Column("images_per_minute", sa.Integer, nullable=True),
)

holds = sa.Table(
    "holds",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("amount_micros", sa.BigInteger, nullable=False),
    sa.Column("captured_micros", sa.BigInteger, nullable=True),
    # "open" until settled: captured in part or whole, and the rest released.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_holds_status_expires_at", "status", "expires_at"),
)

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), nullable=False),
    # "credit", "hold", "capture" or "release".
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("available_delta_micros", sa.BigInteger, nullable=False),
    sa.Column("held_delta_micros", sa.BigInteger, nullable=False),
    sa.Column("hold_id", sa.String(40), nullable=True),
    sa.Column("request_id", sa.String(128), nullable=False, server_default=""),
    sa.Column("note", sa.String(500), nullable=False, server_default=""),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Index("ix_ledger_entries_account_id", "account_id", "id"),
)

idempotency_records = sa.Table(
    "idempotency_records",
    metadata,
    sa.Column("account_id", sa.String(40), sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    # SHA-256 of the request's canonical form: the same key with another body is a conflict.
    sa.Column("fingerprint", sa.String(64), nullable=False),
    # "running" while the first request is in flight, "done" once its result is stored.
    sa.Column("status", sa.String(16), nullable=False),
    # Where the stored result lives in the image store.
    sa.Column("result_ref", sa.String(200), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Index("ix_idempotency_records_expires_at", "expires_at"),
)
