"""Session-wide real services for the tests: PostgreSQL and the Temporal dev server.

PostgreSQL: DATABASE_URL if set, else the machine's server on 127.0.0.1:5432 if it answers,
else an embedded PostgreSQL started here. Either way the session gets a fresh database,
migrated from empty, and dropped at the end; each test that asks for `db` starts from empty
tables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.db import SessionFactory, create_engine, create_session_factory
from core.models import Base
from core.settings import Settings
from core.temporal import DATA_CONVERTER
from devtools.postgres import EmbeddedPostgres
from devtools.temporal_server import PERFORMANCE_ARGS, search_attribute_args, temporal_cli

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Deleting a closed run waits until the server has persisted that its close was processed,
# which it does every 30 s by default: tests that delete runs would wait that long. Temporal's
# own test suite sets 1 s as well.
TEST_SERVER_ARGS = ["--dynamic-config-value", 'history.transferProcessorUpdateAckInterval="1s"']
TABLES = ", ".join(table.name for table in reversed(Base.metadata.sorted_tables))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def connection_budget(database_url: str, wanted: int) -> int:
    """How many extra connections the server allows now (the machine's has max 100)."""
    engine = create_async_engine(database_url, poolclass=NullPool)
    async with engine.connect() as conn:
        limit = (await conn.execute(text("SHOW max_connections"))).scalar_one()
        used = (await conn.execute(text("SELECT count(*) FROM pg_stat_activity"))).scalar_one()
    await engine.dispose()
    return max(2, min(wanted, int(limit) - int(used) - 10))


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def alembic_config(database_url: str) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A libpq URL of a PostgreSQL server we may create databases on."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield make_url(configured).set(drivername="postgresql").render_as_string(False)
        return
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    if _reachable(local):
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="checkout-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data", free_port(), durable=False)
        pg.init()
        proc = pg.start(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            pg.wait_ready(proc=proc)
            yield pg.url(driver="postgresql")
        finally:
            proc.terminate()
            proc.wait(30)


def create_scratch_database(server_url: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return (
        make_url(server_url)
        .set(drivername="postgresql+psycopg", database=name)
        .render_as_string(False)
    )


def drop_database(server_url: str, database_url: str) -> None:
    name = make_url(database_url).database
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(postgres_server: str) -> Iterator[str]:
    url = create_scratch_database(postgres_server, "checkout_test")
    command.upgrade(alembic_config(url), "head")
    yield url
    drop_database(postgres_server, url)


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(
        environment="development", database_url=database_url, admin_token="test-admin-token"
    )


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    yield engine
    await engine.dispose()


@pytest.fixture
async def db(engine: AsyncEngine) -> SessionFactory:
    """A session factory over empty tables."""
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    return create_session_factory(engine)


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server for the session, with the service's search attributes."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=DATA_CONVERTER,
        dev_server_extra_args=[*search_attribute_args(), *PERFORMANCE_ARGS, *TEST_SERVER_ARGS],
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def temporal_address(temporal_env: WorkflowEnvironment) -> str:
    config = temporal_env.client.service_client.config
    return str(config.target_host)


@pytest.fixture
def app_settings(settings: Settings, temporal_address: str) -> Settings:
    return settings.model_copy(
        update={"temporal_address": temporal_address, "temporal_task_queue": f"tq-{uuid.uuid4()}"}
    )


@asynccontextmanager
async def running_app(app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app with its lifespan run, behind an httpx client."""
    app = create_app(app_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://checkout.test"
        ) as client:
            yield client


@pytest.fixture
async def api(db: SessionFactory, app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(app_settings) as client:
        yield client


@pytest.fixture
def admin_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
