"""Database engine and session factory (SQLAlchemy 2, asyncio, psycopg 3)."""

from __future__ import annotations

from typing import TypeAlias

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from core.settings import Settings

SessionFactory: TypeAlias = async_sessionmaker[AsyncSession]


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        # No pre-ping: it costs a round trip per transaction (about doubling the cost of a
        # short one here). A connection broken by a database restart fails its statement
        # instead; activities are retried by Temporal and the API answers 503 `unavailable`.
        pool_pre_ping=False,
        pool_recycle=1800,
        # A request waiting this long for a connection is better answered with 503.
        pool_timeout=10,
        connect_args={"connect_timeout": 5},
        # Errors (logged, and carried in Temporal failures the UI shows) name the statement,
        # never the customer data bound to it.
        hide_parameters=True,
    )


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False)


async def autocommit(session: AsyncSession) -> None:
    """Run the session's statements without BEGIN/COMMIT round trips: for a session of one
    statement, which PostgreSQL applies atomically on its own."""
    await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
