"""Secrets fail closed: outside development the service refuses to start on a missing, empty,
placeholder or short secret, naming the variable; only `development` fills in placeholders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from core.settings import DEV_ADMIN_TOKEN, DEV_STRIPE_WEBHOOK_SECRET, Settings
from tests.conftest import PROJECT_ROOT

STRONG: dict[str, Any] = {
    "admin_token": "a3f9c1d7e5b2a8f4c6d0e9b1",
    "stripe_secret_key": "sk_live_51Nq8p2Kx7LmZ4vT9wR3",
    "stripe_webhook_secret": "whsec_7Hk2Lp9Qr4Ts8Vw1Xy5Z",
    "secret_key": "9c4e1f7a2b8d3e6f0a5c9b2d7e4f1a8c",
}
SECRETS = ("ADMIN_TOKEN", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "SECRET_KEY")


@pytest.fixture(autouse=True)
def no_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*SECRETS, "ENVIRONMENT", "CUSTOMER_JWT_SECRET"):
        monkeypatch.delenv(name, raising=False)


def test_production_is_the_default_and_refuses_to_start_without_secrets() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "ENVIRONMENT=production" in message
    for name in SECRETS:
        assert f"{name} is missing or empty" in message


@pytest.mark.parametrize("name", sorted(STRONG))
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "is missing or empty"),
        ("   ", "is missing or empty"),
        (DEV_ADMIN_TOKEN, "is a placeholder"),
        (DEV_STRIPE_WEBHOOK_SECRET, "is a placeholder"),
        ("changeme-changeme-changeme", "is a placeholder"),
        ("short-secret", "is shorter than 16 characters"),
    ],
)
def test_each_weak_secret_is_refused_by_name(name: str, value: str, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(environment="production", **{**STRONG, name: value})
    assert f"{name.upper()} {why}" in str(refused.value)
    # Only that one is named.
    for other in STRONG.keys() - {name}:
        assert not re.search(rf"(?<![A-Z_]){other.upper()} ", str(refused.value))


def test_any_environment_but_development_is_strict() -> None:
    with pytest.raises(ValidationError):
        Settings(environment="staging")
    assert (
        Settings(environment="staging", **STRONG).admin_token.get_secret_value()
        == (STRONG["admin_token"])
    )


def test_a_short_customer_jwt_secret_is_refused_outside_development() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(environment="production", **STRONG, customer_jwt_secret="sixteen-chars-ok")
    assert "CUSTOMER_JWT_SECRET is shorter than 32 characters" in str(refused.value)


def test_development_fills_placeholders_and_keeps_what_is_set() -> None:
    settings = Settings(environment="development", admin_token="my-own-admin-token")
    assert settings.admin_token.get_secret_value() == "my-own-admin-token"
    assert settings.stripe_webhook_secret.get_secret_value() == DEV_STRIPE_WEBHOOK_SECRET
    assert settings.secret_key.get_secret_value()


@pytest.mark.parametrize(
    "command", [[sys.executable, "-m", "api"], [sys.executable, "worker.py"]], ids=["api", "worker"]
)
def test_the_processes_refuse_to_start_naming_the_variable(command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (*SECRETS, "ENVIRONMENT")}
    env["ADMIN_TOKEN"] = DEV_ADMIN_TOKEN  # a placeholder: refused too
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "ADMIN_TOKEN is a placeholder" in result.stderr
    assert "SECRET_KEY is missing or empty" in result.stderr
    # The refusal names the variable, never a value.
    assert DEV_ADMIN_TOKEN not in result.stderr


def test_a_jwks_over_plain_http_is_refused_outside_development() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(environment="production", **STRONG, customer_jwks_url="http://idp/jwks.json")
    assert "CUSTOMER_JWKS_URL must be an https:// URL" in str(refused.value)
    assert Settings(environment="production", **STRONG, customer_jwks_url="https://idp/jwks.json")
    assert Settings(environment="development", customer_jwks_url="http://127.0.0.1/jwks.json")
