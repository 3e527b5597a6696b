"""Migrations build the schema from an empty database, and tear it down again."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from core.models import Base
from tests.conftest import alembic_config, create_scratch_database, drop_database

TABLES = {
    "products",
    "stock",
    "reservations",
    "orders",
    "order_items",
    "payments",
    "processed_webhook_events",
    "order_events",
    "outbox",
    "checkout_keys",
    "shipping_methods",
    "tax_rates",
    "promotions",
    "promotion_customer_uses",
    "promotion_uses",
    "carts",
    "cart_items",
}


@pytest.fixture
def empty_database(postgres_server: str) -> Iterator[str]:
    url = create_scratch_database(postgres_server, "checkout_migrations")
    yield url
    drop_database(postgres_server, url)


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_empty_builds_every_table_and_downgrade_removes_them(
    empty_database: str,
) -> None:
    config = alembic_config(empty_database)
    assert _tables(empty_database) == set()

    command.upgrade(config, "head")
    assert _tables(empty_database) == TABLES

    command.downgrade(config, "base")
    assert _tables(empty_database) == set()

    command.upgrade(config, "head")
    assert _tables(empty_database) == TABLES


def test_stock_constraints_and_uniqueness_are_in_the_schema(empty_database: str) -> None:
    command.upgrade(alembic_config(empty_database), "head")
    libpq = empty_database.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq) as conn:
        checks = {
            row[0]
            for row in conn.execute(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'stock'::regclass AND contype = 'c'"
            )
        }
        uniques = {
            row[0]
            for row in conn.execute(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'u'"
                " AND conrelid IN ('reservations'::regclass, 'order_events'::regclass)"
            )
        }
        webhook_pk = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'processed_webhook_events'::regclass AND contype = 'p'"
        ).fetchone()
    assert "CHECK ((reserved >= 0))" in checks
    assert "CHECK ((on_hand >= reserved))" in checks
    assert "UNIQUE (checkout_id, sku)" in uniques
    assert "UNIQUE (dedupe_key)" in uniques
    assert webhook_pk == ("PRIMARY KEY (event_id)",)


def test_orm_models_match_the_migrated_columns(empty_database: str) -> None:
    command.upgrade(alembic_config(empty_database), "head")
    engine = create_engine(empty_database, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    column_level = {"add_table", "remove_table", "add_column", "remove_column"}
    drift = [d for d in _flatten(diffs) if d[0] in column_level or d[0].startswith("modify_")]
    assert drift == []


def _flatten(diffs: list[object]) -> Iterator[tuple[str, ...]]:
    for diff in diffs:
        if isinstance(diff, list):
            yield from _flatten(diff)
        else:
            assert isinstance(diff, tuple)
            yield diff
