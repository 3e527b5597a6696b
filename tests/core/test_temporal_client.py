"""The Temporal client of the API and of the worker is configured from the settings: Temporal
Cloud with an API key or a client certificate, or plaintext to the stack's own server. Checked
on a lazily connected client (no server needed): what `connect` hands the SDK is what it uses."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from temporalio.service import TLSConfig

from core.settings import Settings
from core.temporal import connect
from tests.conftest import PROJECT_ROOT
from tests.core.test_settings import STRONG

CLOUD = "us-east-1.aws.api.temporal.io:7233"
NAMESPACE = "checkout.a1b2c"
# What a Temporal Cloud API key looks like to the client: an opaque token.
API_KEY = "eyJhbGciOiJFUzI1NiJ9.cloud-api-key.9f3c1a"


@pytest.fixture(autouse=True)
def no_temporal_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("TEMPORAL_"):
            monkeypatch.delenv(name)


def write_pem_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as PEM files (what Temporal Cloud's CA issues
    looks the same to the client)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def settings(**values: Any) -> Settings:
    return Settings(environment="production", **STRONG, **values)


async def test_plaintext_to_the_stacks_own_server_by_default() -> None:
    client = await connect(settings(temporal_address="temporal:7233"), lazy=True)
    config = client.service_client.config
    assert config.target_host == "temporal:7233"
    assert config.api_key is None
    assert config.tls is False
    assert client.namespace == "default"


async def test_an_api_key_implies_tls_against_the_system_roots() -> None:
    client = await connect(
        settings(temporal_address=CLOUD, temporal_namespace=NAMESPACE, temporal_api_key=API_KEY),
        lazy=True,
    )
    config = client.service_client.config
    assert config.target_host == CLOUD
    assert client.namespace == NAMESPACE
    assert config.api_key == API_KEY
    assert config.tls is True


async def test_a_client_certificate_is_mtls_with_the_files_contents(tmp_path: Path) -> None:
    cert, key = write_pem_pair(tmp_path, "client")
    ca, _ = write_pem_pair(tmp_path, "ca")
    client = await connect(
        settings(
            temporal_address="checkout.a1b2c.tmprl.cloud:7233",
            temporal_namespace=NAMESPACE,
            temporal_tls_cert=str(cert),
            temporal_tls_key=str(key),
            temporal_tls_ca=str(ca),
            temporal_tls_server_name="temporal.internal",
        ),
        lazy=True,
    )
    config = client.service_client.config
    assert config.api_key is None
    assert config.tls == TLSConfig(
        server_root_ca_cert=ca.read_bytes(),
        domain="temporal.internal",
        client_cert=cert.read_bytes(),
        client_private_key=key.read_bytes(),
    )


async def test_an_api_key_with_a_ca_of_our_own(tmp_path: Path) -> None:
    ca, _ = write_pem_pair(tmp_path, "ca")
    client = await connect(settings(temporal_api_key=API_KEY, temporal_tls_ca=str(ca)), lazy=True)
    config = client.service_client.config
    assert config.api_key == API_KEY
    assert config.tls == TLSConfig(server_root_ca_cert=ca.read_bytes())


def test_empty_values_mean_unset() -> None:
    configured = settings(
        temporal_api_key="", temporal_tls_cert="", temporal_tls_key=" ", temporal_tls_ca=""
    )
    assert configured.temporal_api_key is None
    assert configured.temporal_tls_cert is None
    assert configured.temporal_tls_key is None


def test_a_missing_key_file_is_refused_by_name(tmp_path: Path) -> None:
    cert, _ = write_pem_pair(tmp_path, "client")
    with pytest.raises(ValidationError) as refused:
        settings(temporal_tls_cert=str(cert), temporal_tls_key=str(tmp_path / "gone.key"))
    assert [error["loc"] for error in refused.value.errors()] == [("temporal_tls_key",)]
    assert "gone.key is not a readable file" in str(refused.value)


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    cert, _ = write_pem_pair(tmp_path, "client")
    with pytest.raises(ValidationError) as refused:
        settings(temporal_tls_cert=str(cert))
    assert "TEMPORAL_TLS_CERT is set but TEMPORAL_TLS_KEY is not" in str(refused.value)


@pytest.mark.parametrize("command", [["-m", "worker"], ["-m", "api"]])
def test_the_processes_stop_at_start_up_naming_the_missing_key_file(
    tmp_path: Path, command: list[str]
) -> None:
    """Before connecting to anything: exit 2 and the variable's name on stderr."""
    cert, _ = write_pem_pair(tmp_path, "client")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TEMPORAL_", "ENVIRONMENT"))
    }
    env.update({name.upper(): value for name, value in STRONG.items()})
    env.update(
        ENVIRONMENT="production",
        TEMPORAL_ADDRESS="127.0.0.1:1",
        TEMPORAL_TLS_CERT=str(cert),
        TEMPORAL_TLS_KEY=str(tmp_path / "missing.key"),
    )
    started = subprocess.run(
        [sys.executable, *command],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr
    assert "configuration error: TEMPORAL_TLS_KEY:" in started.stderr
    assert "missing.key is not a readable file" in started.stderr


def test_a_placeholder_api_key_is_refused_outside_development() -> None:
    with pytest.raises(ValidationError) as refused:
        settings(temporal_api_key="change-me")
    assert "TEMPORAL_API_KEY is a placeholder" in str(refused.value)


def test_the_data_converter_shares_one_payload_converter_and_round_trips_models() -> None:
    """Every data converter the worker builds (one per activation) gets the same payload
    converter, and it converts pydantic models and plain values as the SDK's own does."""
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.converter import DataConverter, WorkflowSerializationContext

    from core.temporal import DATA_CONVERTER, SharedPydanticPayloadConverter
    from workflows.models import CartItem

    again = DataConverter(payload_converter_class=SharedPydanticPayloadConverter)
    assert SharedPydanticPayloadConverter() is SharedPydanticPayloadConverter()
    shared = SharedPydanticPayloadConverter()
    # A new wrapper of the SDK's each time, around the one converter.
    assert again.payload_converter is not DATA_CONVERTER.payload_converter
    assert again.payload_converter._inner_payload_converter is shared  # type: ignore[attr-defined]
    values = [CartItem(sku="SKU-1", quantity=2), {"a": [1, 2]}, None, "text"]
    ours = DATA_CONVERTER.payload_converter.to_payloads(values)
    assert ours == pydantic_data_converter.payload_converter.to_payloads(values)
    hints: list[type] = [CartItem, dict, type(None), str]
    # No converter of it takes a serialization context: the context leaves it as it is.
    context = WorkflowSerializationContext(namespace="default", workflow_id="checkout-1")
    assert shared.with_context(context) is shared
    assert again.payload_converter.from_payloads(ours, hints) == values
