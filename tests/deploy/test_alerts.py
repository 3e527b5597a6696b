"""The Prometheus rules and the Grafana dashboard under deploy/: valid, tested, and naming only
metrics the service exposes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

RULES = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "checkout-dashboard.json"
# Where the service's own metrics are named (the SDK's `temporal_*` come from its core).
METRIC_SOURCES = [
    "api/metrics.py",
    "core/metrics.py",
    "workflows/checkout.py",
    "workflows/reconciler.py",
]
OUR_METRIC = re.compile(r"\b(?:checkout|http_request)_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        # CI installs it (.ci/run); a developer without it is told, not failed.
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: .ci/run installs Debian's `prometheus` package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run(*args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_the_rules_are_valid() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_fire_as_their_unit_tests_say() -> None:
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert len(tested) >= 2, tested
    result = run(promtool(), "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_rules_and_dashboard_name_metrics_the_service_exposes() -> None:
    source = "\n".join((PROJECT_ROOT / path).read_text() for path in METRIC_SOURCES)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {
        _base(name) for text in [RULES.read_text(), *exprs] for name in OUR_METRIC.findall(text)
    }
    assert used
    missing = sorted(name for name in used if f'"{name}' not in source)
    assert missing == []
