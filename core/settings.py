"""One settings class for the API, the worker and the tools, read from the environment.

Secrets fail closed: `ENVIRONMENT` is `production` unless set, and outside `development` the
service refuses to start when a secret is missing, empty, a known placeholder or shorter than
16 characters (`load_settings` prints which variable and exits non-zero). Only `development`
(what `make run` and the tests set) fills unset secrets with the placeholders below.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEVELOPMENT = "development"

# Development defaults: good enough for `make run` and the tests, refused anywhere else.
DEV_ADMIN_TOKEN = "dev-admin-token"  # noqa: S105
DEV_STRIPE_SECRET_KEY = "sk_test_localstripe"  # noqa: S105
DEV_STRIPE_WEBHOOK_SECRET = "whsec_localstripe_dev"  # noqa: S105
DEV_SECRET_KEY = "dev-secret-key-not-for-production"  # noqa: S105
_DEV_SECRETS = {
    "admin_token": DEV_ADMIN_TOKEN,
    "stripe_secret_key": DEV_STRIPE_SECRET_KEY,
    "stripe_webhook_secret": DEV_STRIPE_WEBHOOK_SECRET,
    "secret_key": DEV_SECRET_KEY,
}
# Values people leave in place from examples and templates (compared case-insensitively).
_PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "placeholder", "replace-me", "xxxx")
_PLACEHOLDERS = {v.lower() for v in _DEV_SECRETS.values()} | {
    "secret",
    "password",
    "admin",
    "token",
    "test",
    "default",
}
MIN_SECRET_LENGTH = 16
# RFC 7518 section 3.2: an HS256 key is at least as long as the hash, 32 bytes.
MIN_JWT_SECRET_LENGTH = 32


class DatabaseSettings(BaseSettings):
    """What migrations need: only the database, no secrets."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/checkout"

    @field_validator("database_url")
    @classmethod
    def _use_psycopg3(cls, url: str) -> str:
        """Accept the libpq-style URLs people paste and run them on psycopg 3."""
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


class LogSettings(DatabaseSettings):
    """What every process of the service reads, the relay's included: where it runs and how it
    logs."""

    # Anything but exactly `development` is treated as production: secrets fail closed.
    environment: str = "production"
    # `json`: one JSON object per line; `text`: for people. Unset: text in development only
    # (core/logs.py).
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_format", mode="before")
    @classmethod
    def _lowercase_format(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower() or None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _uppercase_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @property
    def development(self) -> bool:
        return self.environment == DEVELOPMENT

    @property
    def log_as_json(self) -> bool:
        """JSON lines unless LOG_FORMAT says text, or, unset, in development."""
        if self.log_format is None:
            return not self.development
        return self.log_format == "json"


class EventSettings(LogSettings):
    """What the outbox relay needs (`python -m core.relay`): the database and the broker."""

    # `amqp://user:pass@host:port/vhost`. Unset: no relay runs; events are kept in the outbox
    # (served by GET /admin/events) and go out, oldest first, once a relay runs.
    rabbitmq_url: SecretStr | None = None
    # The durable topic exchange events are published to (declared by the relay).
    events_exchange: str = Field(default="checkout.events", min_length=1, max_length=255)

    @field_validator("rabbitmq_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


def _weakness(value: str, minimum: int) -> str | None:
    """Why a secret must not be used outside development, or None."""
    if not value.strip():
        return "is missing or empty"
    lowered = value.strip().lower()
    if lowered in _PLACEHOLDERS or any(word in lowered for word in _PLACEHOLDER_WORDS):
        return "is a placeholder"
    if len(value) < minimum:
        return f"is shorter than {minimum} characters"
    return None


class Settings(EventSettings):
    database_pool_size: int = Field(default=10, ge=1)
    database_max_overflow: int = Field(default=20, ge=0)

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "checkout"
    # Run workflow code in Temporal's sandbox. Off by default: building a sandbox for every new
    # checkout and crossing it for every payload costs more than the saga's own logic (see the
    # README's benchmark). Determinism is still checked: the workflow tests run the workflow in
    # the full sandbox and the replay test replays recorded histories through it.
    temporal_workflow_sandbox: bool = False
    # Temporal Cloud, or a cluster that wants credentials: an API key (TLS is implied: the
    # system's roots, or TEMPORAL_TLS_CA), or a client certificate and its key for mTLS (PEM
    # files). Neither: plaintext, as to the stack's own server on its private network.
    temporal_api_key: SecretStr | None = None
    temporal_tls_cert: Path | None = None
    temporal_tls_key: Path | None = None
    # The CA the server's certificate is checked against (alone, it turns TLS on); unset: the
    # system's roots, which is what Temporal Cloud needs.
    temporal_tls_ca: Path | None = None
    # The name the server's certificate carries, when it is not the host in TEMPORAL_ADDRESS.
    temporal_tls_server_name: str | None = None

    # Empty means unset: filled with a placeholder in development, refused elsewhere.
    stripe_secret_key: SecretStr = SecretStr("")
    stripe_webhook_secret: SecretStr = SecretStr("")
    # Unset means real Stripe; the dev stack points it at the stand-in.
    stripe_api_base: str | None = None

    checkout_payment_timeout: int = Field(default=900, ge=1, description="seconds")
    admin_token: SecretStr = SecretStr("")
    # The server's own secret: order access tokens are HMACs under it, and the client secrets
    # kept for idempotent replays are encrypted with a key derived from it.
    secret_key: SecretStr = SecretStr("")

    # Customer JWTs: HS256 under the secret, or RS256/ES256 against the JWKS. Neither set: the
    # service serves guests and admin only.
    customer_jwt_secret: SecretStr | None = None
    customer_jwks_url: str | None = None
    customer_jwt_issuer: str | None = None
    customer_jwt_audience: str | None = None

    # How long an Idempotency-Key keeps its answer (never less than the payment window).
    idempotency_key_ttl: int = Field(default=86400, ge=1, description="seconds")
    # Per client address and per customer, in the `limits` notation ("30/minute").
    rate_limit_checkouts: str = "30/minute"
    # POST /checkout/quote per client address: a page view may quote, so a wider budget.
    rate_limit_quotes: str = "120/minute"
    # Refused admin-token candidates per client address: past it, every admin token of that
    # address (the right one too) is answered 429 until its window has room, so that it cannot
    # be guessed at speed (order tokens and customer JWTs cannot be guessed: not counted). The
    # same rate, a budget of its own, for METRICS_TOKEN on /metrics.
    rate_limit_auth_failures: str = "20/minute"
    # POST /carts per client address (a guest's cart is a row until CART_TTL): a budget of its
    # own, so that carts never spend a client's checkouts or quotes.
    rate_limit_carts: str = "60/minute"
    max_pending_checkouts: int = Field(default=3, ge=1)
    # Shared rate-limit counters between API processes; unset: per process.
    redis_url: str | None = None
    # Addresses or CIDRs of the reverse proxies whose X-Forwarded-For is believed.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Seconds between two runs of the `checkout-reconciler` schedule.
    reconcile_interval: int = Field(default=60, ge=1)
    # Carts: a guest cart expires this many seconds after its last change (30 days).
    cart_ttl: int = Field(default=30 * 86400, ge=1, description="seconds")

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_access_log: bool = True
    # Requests larger than this are refused with 413 before their body is parsed.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

    @field_validator(
        "temporal_api_key",
        "temporal_tls_cert",
        "temporal_tls_key",
        "temporal_tls_ca",
        "temporal_tls_server_name",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `VAR=` in an env file or a compose file means "not configured", not a path ".".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("temporal_tls_cert", "temporal_tls_key", "temporal_tls_ca")
    @classmethod
    def _readable_file(cls, path: Path | None) -> Path | None:
        # Checked at start-up, so that a missing secret mount stops the process with the
        # variable's name instead of failing the first connection minutes later.
        if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
            raise ValueError(f"{path} is not a readable file")
        return path

    # The worker's Prometheus endpoint (the Temporal SDK's metrics and the worker's own, one
    # endpoint served by the SDK's core); port 0: none.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9464, ge=0, le=65535)
    # When set, GET /metrics wants `Authorization: Bearer <METRICS_TOKEN>`; unset, it is public
    # like /healthz (it carries counts and route templates, never an id or customer data).
    metrics_token: SecretStr | None = None
    # OpenTelemetry is configured the SDK's own way, from OTEL_* variables that it reads itself
    # (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, ...): see
    # core/tracing.py.

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _client_certificate_pairs(self) -> Settings:
        if (self.temporal_tls_cert is None) != (self.temporal_tls_key is None):
            given, missing = (
                ("TEMPORAL_TLS_CERT", "TEMPORAL_TLS_KEY")
                if self.temporal_tls_key is None
                else ("TEMPORAL_TLS_KEY", "TEMPORAL_TLS_CERT")
            )
            raise ValueError(f"{given} is set but {missing} is not: mTLS needs both")
        return self

    @model_validator(mode="after")
    def _secrets_fail_closed(self) -> Settings:
        if self.development:
            for name, placeholder in _DEV_SECRETS.items():
                if not getattr(self, name).get_secret_value():
                    setattr(self, name, SecretStr(placeholder))
            return self
        problems = []
        for name in _DEV_SECRETS:
            why = _weakness(getattr(self, name).get_secret_value(), MIN_SECRET_LENGTH)
            if why:
                problems.append(f"{name.upper()} {why}")
        if self.customer_jwt_secret is not None:
            why = _weakness(self.customer_jwt_secret.get_secret_value(), MIN_JWT_SECRET_LENGTH)
            if why:
                problems.append(f"CUSTOMER_JWT_SECRET {why}")
        if self.temporal_api_key is not None:
            why = _weakness(self.temporal_api_key.get_secret_value(), MIN_SECRET_LENGTH)
            if why:
                problems.append(f"TEMPORAL_API_KEY {why}")
        if self.customer_jwks_url and not self.customer_jwks_url.startswith("https://"):
            # Over plain HTTP anyone on the path could hand us keys that sign any customer.
            problems.append("CUSTOMER_JWKS_URL must be an https:// URL")
        if problems:
            raise ValueError(
                f"ENVIRONMENT={self.environment}: "
                + "; ".join(problems)
                + " (set them, or ENVIRONMENT=development for local use)"
            )
        return self

    @property
    def idempotency_ttl_seconds(self) -> int:
        """A key outlives its checkout's payment window, whatever the configuration says."""
        return max(self.idempotency_key_ttl, self.checkout_payment_timeout + 3600)


def load_settings() -> Settings:
    """Settings for a process's `main()`: a configuration error names the variable and exits 2
    instead of starting on a bad or missing secret."""
    return _load(Settings)


def load_event_settings() -> EventSettings:
    """The relay's settings (no service secrets), with the same error handling."""
    return _load(EventSettings)


_S = TypeVar("_S", bound=BaseSettings)


def _load(cls: type[_S]) -> _S:
    try:
        return cls()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ())) or "configuration"
            print(f"configuration error: {where.upper()}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
