"""`make run`'s supervisor, for real: every part comes up healthy on the embedded defaults,
the API works over HTTP, SIGTERM leaves no process behind, and a second run keeps the data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from core.settings import DEV_ADMIN_TOKEN, DEV_STRIPE_SECRET_KEY
from tests.conftest import PROJECT_ROOT, free_port

pytestmark = pytest.mark.e2e

EXTERNAL = (
    "DATABASE_URL",
    "TEMPORAL_ADDRESS",
    "STRIPE_SECRET_KEY",
    "STRIPE_API_BASE",
    "ADMIN_TOKEN",
)


class RunningStack:
    def __init__(self, data_dir: Path) -> None:
        self.ports = {
            "API_PORT": free_port(),
            "DEV_POSTGRES_PORT": free_port(),
            "DEV_TEMPORAL_PORT": free_port(),
            "DEV_TEMPORAL_UI_PORT": free_port(),
            "DEV_STRIPE_PORT": free_port(),
        }
        env = {k: v for k, v in os.environ.items() if k not in EXTERNAL}
        env.update({k: str(v) for k, v in self.ports.items()}, DATA_DIR=str(data_dir))
        self.output = data_dir.parent / f"stack-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.stack"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self.output.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.api = f"http://127.0.0.1:{self.ports['API_PORT']}"

    def wait_up(self, timeout: float = 150) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output.read_text(errors="replace")
            if "Checkout service is up" in text:
                return text
            if self.proc.poll() is not None:
                pytest.fail(f"make run exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.5)
        pytest.fail("make run did not come up:\n" + self.output.read_text(errors="replace")[-3000:])

    def descendants(self) -> list[psutil.Process]:
        children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=True)
        return children

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def stack(data_dir: Path) -> Iterator[RunningStack]:
    running = RunningStack(data_dir)
    yield running
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait(30)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _left_behind(processes: list[psutil.Process], timeout: float = 10) -> list[psutil.Process]:
    """The processes still alive once those the supervisor killed have had time to die."""
    deadline = time.monotonic() + timeout
    while (alive := _alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_make_run_starts_every_part_healthy_and_stops_them_all(
    stack: RunningStack, data_dir: Path
) -> None:
    banner = stack.wait_up()
    for expected in (stack.api + "/docs", "Temporal UI", "Stripe stand-in", "PostgreSQL"):
        assert expected in banner

    health = httpx.get(stack.api + "/healthz", timeout=5)
    assert health.json() == {"status": "ok", "database": "ok", "temporal": "ok"}
    ui = httpx.get(f"http://127.0.0.1:{stack.ports['DEV_TEMPORAL_UI_PORT']}/", timeout=5)
    assert ui.status_code == 200
    stripe = httpx.get(
        f"http://127.0.0.1:{stack.ports['DEV_STRIPE_PORT']}/v1/customers",
        auth=(DEV_STRIPE_SECRET_KEY, ""),
        timeout=5,
    )
    assert stripe.status_code == 200
    assert stripe.json()["object"] == "list"

    put = httpx.put(
        stack.api + "/admin/products/KEEP-1",
        json={"name": "Kept", "unit_price": 500, "currency": "usd", "on_hand": 7},
        headers={"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"},
        timeout=5,
    )
    assert put.status_code == 200

    children = stack.descendants()
    names = " ".join(" ".join(p.cmdline()) for p in children)
    for part in ("postgres", "temporal", "stripe_standin", "worker.py", "-m api"):
        assert part in names

    assert stack.stop(signal.SIGTERM) == 0
    assert _left_behind(children) == []

    # A second run keeps the data of the first.
    again = RunningStack(data_dir)
    try:
        again.wait_up()
        inventory = httpx.get(again.api + "/inventory/KEEP-1", timeout=5)
        assert inventory.json() == {"sku": "KEEP-1", "on_hand": 7, "reserved": 0, "available": 7}
        children = again.descendants()
        assert again.stop(signal.SIGINT) == 0
        assert _left_behind(children) == []
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
