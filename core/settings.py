"""One settings class for the API, the worker and the tools, read from the environment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Development defaults: good enough for `make run` and the tests, refused anywhere else.
DEV_ADMIN_TOKEN = "dev-admin-token"  # noqa: S105
DEV_STRIPE_SECRET_KEY = "sk_test_localstripe"  # noqa: S105
DEV_STRIPE_WEBHOOK_SECRET = "whsec_localstripe_dev"  # noqa: S105
_PLACEHOLDERS = {DEV_ADMIN_TOKEN, DEV_STRIPE_SECRET_KEY, DEV_STRIPE_WEBHOOK_SECRET}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    environment: Literal["development", "test", "production"] = "development"

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/checkout"
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

    stripe_secret_key: SecretStr = SecretStr(DEV_STRIPE_SECRET_KEY)
    stripe_webhook_secret: SecretStr = SecretStr(DEV_STRIPE_WEBHOOK_SECRET)
    # Unset means real Stripe; the dev stack points it at the stand-in.
    stripe_api_base: str | None = None

    checkout_payment_timeout: int = Field(default=900, ge=1, description="seconds")
    admin_token: SecretStr = SecretStr(DEV_ADMIN_TOKEN)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_access_log: bool = True
    # Requests larger than this are refused with 413 before their body is parsed.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

    @field_validator("database_url")
    @classmethod
    def _use_psycopg3(cls, url: str) -> str:
        """Accept the libpq-style URLs people paste and run them on psycopg 3."""
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @model_validator(mode="after")
    def _no_placeholder_secrets_in_production(self) -> Settings:
        if self.environment == "production":
            for name in ("admin_token", "stripe_secret_key", "stripe_webhook_secret"):
                value: SecretStr = getattr(self, name)
                if value.get_secret_value() in _PLACEHOLDERS:
                    raise ValueError(f"{name.upper()} must be set outside development")
        return self
