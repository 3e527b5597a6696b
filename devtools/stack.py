"""`make run`: the whole service on one machine, in one foreground command.

Starts what is not configured from outside (PostgreSQL unless DATABASE_URL is set, the Temporal
dev server unless TEMPORAL_ADDRESS is set, the Stripe stand-in unless STRIPE_SECRET_KEY is
set), applies migrations, then the worker and the API; waits until every part is healthy,
prints where to look, and on Ctrl-C or SIGTERM stops every child it started.
Data lives under DATA_DIR (default .data/) and survives restarts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.settings import DEV_ADMIN_TOKEN, DEV_STRIPE_SECRET_KEY, DEV_STRIPE_WEBHOOK_SECRET
from devtools.postgres import EmbeddedPostgres, create_database
from devtools.supervisor import Supervisor, wait_until
from devtools.temporal_server import start_dev_argv

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Ports:
    api: int
    postgres: int
    temporal: int
    temporal_ui: int
    stripe: int

    @classmethod
    def from_env(cls) -> Ports:
        env = os.environ
        return cls(
            api=int(env.get("API_PORT", "8000")),
            postgres=int(env.get("DEV_POSTGRES_PORT", "55432")),
            temporal=int(env.get("DEV_TEMPORAL_PORT", "7233")),
            temporal_ui=int(env.get("DEV_TEMPORAL_UI_PORT", "8233")),
            stripe=int(env.get("DEV_STRIPE_PORT", "8420")),
        )


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own URL
        return bool(response.status == 200)


def _refuse_busy(port: int, what: str) -> None:
    if _port_open("127.0.0.1", port):
        raise SystemExit(
            f"port {port} for {what} is already in use: is another `make run` running?"
        )


class Stack:
    def __init__(
        self, data_dir: Path, ports: Ports, *, keep_stripe_state: bool = True, quiet: bool = False
    ) -> None:
        self.keep_stripe_state = keep_stripe_state
        self.data_dir = data_dir.resolve()
        self.ports = ports
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # `make run` is for development: unset secrets take the development placeholders. Set
        # ENVIRONMENT=production to run it with real secrets (then every secret must be set).
        self.env.setdefault("ENVIRONMENT", "development")
        self.supervisor = Supervisor(self.data_dir / "logs", console=None if quiet else sys.stdout)
        self.where: list[tuple[str, str]] = []

    def up(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._postgres()
        self._migrate()
        self._temporal()
        self._stripe()
        self._worker()
        self._api()

    def _postgres(self) -> None:
        if "DATABASE_URL" in os.environ:
            self.where.append(("PostgreSQL", "DATABASE_URL (external)"))
            return
        _refuse_busy(self.ports.postgres, "PostgreSQL")
        pg = EmbeddedPostgres(self.data_dir / "postgres", self.ports.postgres)
        pg.init()
        proc = self.supervisor.start(
            "postgres", pg.argv(), stop_signal=signal.SIGINT, user=pg.user, echo=False
        )
        pg.wait_ready(timeout=60, proc=proc)
        create_database(pg.url(driver="postgresql"), "checkout")
        self.env["DATABASE_URL"] = pg.url("checkout")
        self.where.append(("PostgreSQL", pg.url("checkout", driver="postgresql")))

    def _migrate(self) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config(str(PROJECT_ROOT / "alembic.ini"))
        config.attributes["database_url"] = self.env.get("DATABASE_URL")
        config.attributes["configure_logging"] = False
        command.upgrade(config, "head")

    def _temporal(self) -> None:
        if "TEMPORAL_ADDRESS" in os.environ:
            self.where.append(("Temporal", os.environ["TEMPORAL_ADDRESS"] + " (external)"))
            return
        _refuse_busy(self.ports.temporal, "Temporal")
        _refuse_busy(self.ports.temporal_ui, "the Temporal UI")
        argv = start_dev_argv(
            db_file=self.data_dir / "temporal.db",
            ip="127.0.0.1",
            port=self.ports.temporal,
            ui_port=self.ports.temporal_ui,
            namespace=self.env.get("TEMPORAL_NAMESPACE", "default"),
        )
        proc = self.supervisor.start("temporal", argv, echo=False)
        address = f"127.0.0.1:{self.ports.temporal}"
        wait_until(lambda: _temporal_healthy(address), timeout=60, what="Temporal", alive=proc)
        self.env["TEMPORAL_ADDRESS"] = address
        ui = f"http://127.0.0.1:{self.ports.temporal_ui}"
        wait_until(lambda: _http_ok(ui), timeout=30, what="the Temporal UI", alive=proc)
        self.where.append(("Temporal UI", ui))
        self.where.append(("Temporal gRPC", address))

    def _stripe(self) -> None:
        if "STRIPE_SECRET_KEY" in os.environ:
            self.where.append(("Stripe", "real Stripe (STRIPE_SECRET_KEY is set)"))
            return
        _refuse_busy(self.ports.stripe, "the Stripe stand-in")
        base = f"http://127.0.0.1:{self.ports.stripe}"
        secret = self.env.setdefault("STRIPE_WEBHOOK_SECRET", DEV_STRIPE_WEBHOOK_SECRET)
        webhook_url = f"http://127.0.0.1:{self.ports.api}/webhooks/stripe"
        argv = [
            sys.executable, "-m", "devtools.stripe_standin",
            "--port", str(self.ports.stripe),
            "--webhook-url", webhook_url,
            "--webhook-secret", secret,
        ]  # fmt: skip
        if self.keep_stripe_state:
            argv += ["--state-file", str(self.data_dir / "localstripe.pickle")]
        proc = self.supervisor.start("stripe", argv, env=self.env, cwd=PROJECT_ROOT)
        wait_until(
            lambda: _port_open("127.0.0.1", self.ports.stripe),
            timeout=30,
            what="the Stripe stand-in",
            alive=proc,
        )
        self.env["STRIPE_SECRET_KEY"] = DEV_STRIPE_SECRET_KEY
        self.env["STRIPE_API_BASE"] = base
        self.where.append(("Stripe stand-in", f"{base} (webhooks to {webhook_url})"))

    def _worker(self) -> None:
        started = datetime.now(UTC)
        proc = self.supervisor.start(
            "worker",
            [sys.executable, str(PROJECT_ROOT / "worker.py")],
            env=self.env,
            cwd=PROJECT_ROOT,
        )
        address = self.env.get("TEMPORAL_ADDRESS", "127.0.0.1:7233")
        namespace = self.env.get("TEMPORAL_NAMESPACE", "default")
        queue = self.env.get("TEMPORAL_TASK_QUEUE", "checkout")
        wait_until(
            lambda: _worker_polling(address, namespace, queue, since=started),
            timeout=60,
            what="the worker",
            alive=proc,
        )

    def _api(self) -> None:
        _refuse_busy(self.ports.api, "the API")
        self.env["API_PORT"] = str(self.ports.api)
        proc = self.supervisor.start(
            "api", [sys.executable, "-m", "api"], env=self.env, cwd=PROJECT_ROOT
        )
        url = f"http://127.0.0.1:{self.ports.api}"
        wait_until(lambda: _http_ok(url + "/healthz"), timeout=60, what="the API", alive=proc)
        self.where.insert(0, ("API", url))
        self.where.insert(1, ("API docs", url + "/docs"))

    def banner(self) -> str:
        width = max(len(name) for name, _ in self.where)
        lines = [f"  {name:<{width}}  {place}" for name, place in self.where]
        token = "" if "ADMIN_TOKEN" in os.environ else f"  admin token: {DEV_ADMIN_TOKEN}\n"
        return (
            "\nCheckout service is up:\n"
            + "\n".join(lines)
            + "\n"
            + token
            + f"  data and logs under {self.data_dir}\n  Ctrl-C stops everything.\n"
        )


def _temporal_healthy(address: str) -> bool:
    from temporalio.client import Client

    async def check() -> bool:
        client = await Client.connect(address)
        return await client.service_client.check_health(timeout=timedelta(seconds=2))

    return asyncio.run(check())


def _worker_polling(address: str, namespace: str, queue: str, *, since: datetime) -> bool:
    """True once a poller of this run's worker shows on the task queue."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
    from temporalio.client import Client

    async def check() -> bool:
        client = await Client.connect(address, namespace=namespace)
        for kind in (
            TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        ):
            response = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
                )
            )
            if any(p.last_access_time.ToDatetime(UTC) >= since for p in response.pollers):
                return True
        return False

    return asyncio.run(check())


def main() -> int:
    stop = threading.Event()
    started = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        if stop.is_set():
            return  # already stopping; let the shutdown finish
        stop.set()
        if not started.is_set():
            raise KeyboardInterrupt  # interrupt a start-up wait at once

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    stack = Stack(Path(os.environ.get("DATA_DIR", PROJECT_ROOT / ".data")), Ports.from_env())
    code = 0
    try:
        stack.up()
        started.set()
        print(stack.banner(), flush=True)
        while not stop.wait(0.5):
            gone = stack.supervisor.exited()
            if gone is not None:
                print(
                    f"{gone.name} exited with code {gone.proc.returncode}; stopping everything "
                    f"(its log: {gone.log_path})",
                    file=sys.stderr,
                )
                code = 1
                break
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"startup failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        stop.set()
        print("stopping...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        stack.supervisor.stop_all()
        print(f"stopped in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
