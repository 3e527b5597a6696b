"""A property-based fuzz run of the whole API from its OpenAPI document (schemathesis),
against the stack `make run` starts: no 5xx, every error in the contract's shape, every
answer as the document describes it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import DEV_ADMIN_TOKEN
from tests.conftest import PROJECT_ROOT
from tests.e2e.test_dev_stack import RunningStack

pytestmark = pytest.mark.e2e


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningStack]:
    stack = RunningStack(tmp_path / "data")
    try:
        stack.wait_up()
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize("as_admin", [True, False], ids=["admin", "customer"])
def test_fuzzing_the_openapi_document_finds_no_server_error(
    running: RunningStack, as_admin: bool
) -> None:
    headers = ["-H", f"Authorization: Bearer {DEV_ADMIN_TOKEN}"] if as_admin else []
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{running.api}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,"
            "content_type_conformance,response_schema_conformance,error_shape",
            "--max-examples",
            os.environ.get("FUZZ_MAX_EXAMPLES", "30"),
            "--seed",
            "20261122",
            "--request-timeout",
            "35",
            "--phases",
            "examples,coverage,fuzzing",
            *headers,
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
