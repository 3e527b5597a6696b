"""What the deployment files are, read as data: the compose files, .env.example, the Settings
the service reads. No Docker engine runs where these tests do, so they check the files
statically, with the tools that work offline (hadolint, check-jsonschema, shellcheck,
promtool). A tool that is missing fails its test under CI=true and skips it elsewhere."""

from __future__ import annotations

import os
import re
import shutil
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings
from tests.conftest import PROJECT_ROOT

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
DEV_COMPOSE_FILE = PROJECT_ROOT / "docker-compose.dev.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"

# Read by the processes of the service besides core/settings.py: the order-events relay
# (RABBITMQ_URL, EVENTS_EXCHANGE), the worker's metrics port, logs and traces.
OTHER_SERVICE_VARIABLES = (
    "RABBITMQ_URL",
    "EVENTS_EXCHANGE",
    "WORKER_METRICS_PORT",
    "LOG_FORMAT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def require_tool(name: str, where: str) -> str:
    """The tool's path: the one installed beside this interpreter (a dev-extra wheel), else
    on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        message = f"{name} is not installed ({where})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@cache
def compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


def services(path: Path = COMPOSE_FILE) -> dict[str, dict[str, Any]]:
    found = compose(path)["services"]
    assert isinstance(found, dict)
    return found


def environment(service: str) -> dict[str, Any]:
    found = services()[service].get("environment", {})
    assert isinstance(found, dict), f"{service}: environment as a mapping"
    return found


def settings_variables() -> set[str]:
    """Every environment variable core/settings.py reads: its fields, upper-cased."""
    return {name.upper() for name in Settings.model_fields}


_ASSIGNMENT = re.compile(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> tuple[dict[str, str], set[str]]:
    """.env.example as (the variables it sets, every variable it documents: set, commented
    out as `# NAME=...`, or named in its comments)."""
    assigned: dict[str, str] = {}
    documented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := _ASSIGNMENT.match(line):
            documented.add(match[2])
            if match[1] is None:
                assigned[match[2]] = match[3]
        elif line.lstrip().startswith("#"):
            documented.update(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", line))
    return assigned, documented


def interpolated_variables(path: Path = COMPOSE_FILE) -> set[str]:
    """Every ${NAME...} the compose file asks its environment (.env) for."""
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", path.read_text()))


_REFERENCE = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def interpolate(value: str, dotenv: dict[str, str]) -> str:
    """Compose's interpolation of `${NAME}`, `${NAME:-default}` and `${NAME:?message}` (the
    forms the compose file uses): an unset or empty NAME takes the default, or is an error."""

    def resolve(match: re.Match[str]) -> str:
        name, operator, argument = match[1], match[2], match[3]
        found = dotenv.get(name, "")
        if found:
            return found
        if operator == ":?":
            raise KeyError(f"required variable {name} is missing a value: {argument}")
        return argument if operator == ":-" else ""

    return _REFERENCE.sub(resolve, value)
