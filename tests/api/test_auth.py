"""The bearer header read into a caller: admin, order access tokens and customer JWTs, with real
PyJWT, real keys and a real JWKS endpoint (a local aiohttp server). Every credential that does
not verify is `Unauthorized` (401), never another exception."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from api.auth import (
    NO_CUSTOMER_TOKENS,
    ORDER_TOKEN_PREFIX,
    Authenticator,
    Caller,
    CallerKind,
)
from core.errors import Forbidden, Unauthorized, Unavailable
from core.settings import Settings
from tests.conftest import free_port

ADMIN_TOKEN = "test-admin-token"
SECRET_KEY = "test-secret-key-0123456789abcdef"
JWT_SECRET = "customer-jwt-secret-for-the-tests-0123456789"
ORDER_A = uuid.UUID("0a4f7f5e-9c1b-4d3e-8f2a-1b2c3d4e5f60")
ORDER_B = uuid.UUID("6b1c2d3e-4f50-4a6b-9c8d-7e6f5a4b3c2d")


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "development",
        "admin_token": ADMIN_TOKEN,
        "secret_key": SECRET_KEY,
    }
    return Settings(**(values | overrides))


def bearer(token: str) -> str:
    return f"Bearer {token}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def claims(*, without: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {"sub": "user-42", "email": "ada@example.com", "iat": now, "exp": now + 300}
    values |= overrides
    return {name: value for name, value in values.items() if name not in without}


def hs256(payload: dict[str, Any], secret: str = JWT_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def hand_signed(header: dict[str, Any], payload: Any, key: bytes | None) -> str:
    """A JWT built without PyJWT, for what PyJWT refuses to make: `alg: none`, HMAC over a PEM."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if key is None:
        return signing_input + "."
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def refused(auth: Authenticator, authorization: str) -> str:
    with pytest.raises(Unauthorized) as caught:
        await auth.authenticate(authorization)
    return caught.value.message


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(make_settings(customer_jwt_secret=JWT_SECRET))


# --- the header and admin ---------------------------------------------------------------------


async def test_no_header_is_a_guest() -> None:
    caller = await Authenticator(make_settings()).authenticate(None)
    assert caller == Caller(CallerKind.GUEST)
    assert not caller.is_admin


async def test_the_admin_token_is_admin(auth: Authenticator) -> None:
    caller = await auth.authenticate(bearer(ADMIN_TOKEN))
    assert caller.kind is CallerKind.ADMIN
    assert caller.is_admin
    assert (await auth.authenticate(f"bearer  {ADMIN_TOKEN} ")).is_admin


@pytest.mark.parametrize(
    "authorization",
    [
        bearer("wrong-admin-token"),
        bearer(ADMIN_TOKEN + "x"),
        bearer(ADMIN_TOKEN[:-1]),
        f"Basic {ADMIN_TOKEN}",
        f"Token {ADMIN_TOKEN}",
        ADMIN_TOKEN,
        "Bearer",
        "Bearer   ",
        "",
        bearer("one.two"),
        bearer("ot"),
    ],
)
async def test_a_wrong_or_malformed_header_is_unauthorized(
    auth: Authenticator, authorization: str
) -> None:
    await refused(auth, authorization)


# --- order access tokens ----------------------------------------------------------------------


async def test_an_order_token_reaches_its_order_and_is_the_same_every_time(
    auth: Authenticator,
) -> None:
    token = auth.order_token(ORDER_A)
    assert token.startswith(ORDER_TOKEN_PREFIX)
    assert len(token) == len(ORDER_TOKEN_PREFIX) + 64
    # Deterministic across instances: a replay after a restart returns the same token.
    assert Authenticator(make_settings()).order_token(ORDER_A) == token
    caller = await auth.authenticate(bearer(token))
    assert caller == Caller(CallerKind.ORDER, order_id=ORDER_A)
    assert not caller.is_admin


def _flip(token: str, index: int) -> str:
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda t: _flip(t, -1), id="last-char-of-mac"),
        pytest.param(lambda t: _flip(t, len(ORDER_TOKEN_PREFIX)), id="first-char-of-order-id"),
        pytest.param(lambda t: t[:-1], id="truncated-by-one"),
        pytest.param(lambda t: t[: len(ORDER_TOKEN_PREFIX) + 22], id="order-id-only"),
        pytest.param(lambda t: t + "A", id="extended"),
        pytest.param(lambda t: t + "==", id="padded"),
        pytest.param(lambda t: t[:-1] + "+", id="standard-base64-char"),
        pytest.param(lambda t: t[:-1] + "é", id="non-ascii"),
        pytest.param(lambda t: ORDER_TOKEN_PREFIX, id="prefix-only"),
        pytest.param(lambda t: "OT_" + t[3:], id="prefix-case"),
    ],
)
async def test_a_tampered_order_token_is_unauthorized(auth: Authenticator, tamper: Any) -> None:
    await refused(auth, bearer(tamper(auth.order_token(ORDER_A))))


async def test_an_order_token_made_under_another_secret_key_is_unauthorized(
    auth: Authenticator,
) -> None:
    other = Authenticator(make_settings(secret_key="another-secret-key-0123456789"))
    await refused(auth, bearer(other.order_token(ORDER_A)))


async def test_an_order_token_for_one_order_does_not_claim_another(auth: Authenticator) -> None:
    token_a, token_b = auth.order_token(ORDER_A), auth.order_token(ORDER_B)
    assert token_a != token_b
    assert (await auth.authenticate(bearer(token_a))).order_id == ORDER_A
    # B's id with A's signature: the signature covers the id.
    mac_a = base64.urlsafe_b64decode(token_a[len(ORDER_TOKEN_PREFIX) :])[16:]
    spliced = ORDER_TOKEN_PREFIX + b64(ORDER_B.bytes + mac_a)
    await refused(auth, bearer(spliced))


def test_the_order_token_key_is_separated_from_the_raw_secret_key(auth: Authenticator) -> None:
    """A plain HMAC under SECRET_KEY (what another feature might sign with) is no order token."""
    naive = hmac.new(SECRET_KEY.encode(), ORDER_A.bytes, hashlib.sha256).digest()
    assert auth.order_token(ORDER_A) != ORDER_TOKEN_PREFIX + b64(ORDER_A.bytes + naive)


# --- customer JWTs under the shared secret ----------------------------------------------------


async def test_an_hs256_customer_token_is_the_customer(auth: Authenticator) -> None:
    caller = await auth.authenticate(bearer(hs256(claims())))
    assert caller == Caller(CallerKind.CUSTOMER, user_id="user-42", email="ada@example.com")
    assert not caller.is_admin
    without_email = await auth.authenticate(bearer(hs256(claims(without=("email",)))))
    assert without_email == Caller(CallerKind.CUSTOMER, user_id="user-42")


async def test_a_token_just_past_exp_is_within_the_leeway(auth: Authenticator) -> None:
    caller = await auth.authenticate(bearer(hs256(claims(exp=int(time.time()) - 5))))
    assert caller.user_id == "user-42"


async def test_an_audience_in_the_token_is_ignored_when_none_is_configured(
    auth: Authenticator,
) -> None:
    caller = await auth.authenticate(bearer(hs256(claims(aud="somebody-else", iss="anyone"))))
    assert caller.user_id == "user-42"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(claims(exp=int(time.time()) - 120), "expired", id="expired"),
        pytest.param(claims(nbf=int(time.time()) + 600), "not valid yet", id="nbf-in-future"),
        pytest.param(claims(iat=int(time.time()) + 600), "not valid yet", id="iat-in-future"),
        pytest.param(claims(without=("sub",)), "'sub'", id="missing-sub"),
        pytest.param(claims(without=("exp",)), "'exp'", id="missing-exp"),
        pytest.param(claims(sub=""), "'sub'", id="empty-sub"),
        pytest.param(claims(sub="   "), "'sub'", id="blank-sub"),
        pytest.param(claims(sub=42), "not valid", id="numeric-sub"),
        pytest.param(claims(sub="u" * 256), "'sub'", id="sub-too-long"),
        pytest.param(claims(email=["a@example.com"]), "'email'", id="email-not-a-string"),
        pytest.param(claims(exp="tomorrow"), "not valid", id="exp-not-a-number"),
    ],
)
async def test_bad_claims_are_unauthorized(
    auth: Authenticator, payload: dict[str, Any], reason: str
) -> None:
    assert reason in await refused(auth, bearer(hs256(payload)))


async def test_a_token_signed_with_another_secret_is_unauthorized(auth: Authenticator) -> None:
    token = hs256(claims(), secret="another-customer-secret-0123456789abcdef")
    assert "badly signed" in await refused(auth, bearer(token))


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("a.b.c", id="not-base64-json"),
        pytest.param(hs256(claims())[:-4] + ".x", id="four-parts"),
        pytest.param(hs256(claims()).rsplit(".", 1)[0] + ".", id="signature-stripped"),
        pytest.param(
            hand_signed({"alg": "HS256"}, ["not", "an", "object"], JWT_SECRET.encode()),
            id="payload-not-an-object",
        ),
    ],
)
async def test_a_malformed_jwt_is_unauthorized(auth: Authenticator, token: str) -> None:
    await refused(auth, bearer(token))


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
async def test_alg_none_is_unauthorized(auth: Authenticator, alg: str) -> None:
    token = hand_signed({"alg": alg, "typ": "JWT"}, claims(), None)
    assert token.count(".") == 2
    assert "algorithm not accepted" in await refused(auth, bearer(token))


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        pytest.param(
            {"customer_jwt_issuer": "https://id.example.com"},
            "from another issuer",
            id="wrong-issuer",
        ),
        pytest.param(
            {"customer_jwt_audience": "checkout-api"}, "another audience", id="wrong-audience"
        ),
    ],
)
async def test_issuer_and_audience_are_checked_when_configured(
    configured: dict[str, str], expected: str
) -> None:
    auth = Authenticator(make_settings(customer_jwt_secret=JWT_SECRET, **configured))
    token = hs256(claims(iss="https://evil.example.com", aud="another-api"))
    assert expected in await refused(auth, bearer(token))


async def test_issuer_and_audience_are_required_when_configured() -> None:
    auth = Authenticator(
        make_settings(
            customer_jwt_secret=JWT_SECRET,
            customer_jwt_issuer="https://id.example.com",
            customer_jwt_audience="checkout-api",
        )
    )
    good = claims(iss="https://id.example.com", aud=["checkout-api", "other"])
    assert (await auth.authenticate(bearer(hs256(good)))).user_id == "user-42"
    assert "'iss'" in await refused(auth, bearer(hs256(claims(aud="checkout-api"))))
    assert "'aud'" in await refused(auth, bearer(hs256(claims(iss="https://id.example.com"))))


@pytest.mark.parametrize(
    "configured",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"customer_jwt_secret": ""}, id="empty-secret"),
        pytest.param({"customer_jwks_url": ""}, id="empty-jwks-url"),
    ],
)
async def test_without_jwt_configuration_every_jwt_is_unauthorized(
    configured: dict[str, str],
) -> None:
    auth = Authenticator(make_settings(**configured))
    signed_with_nothing = hand_signed({"alg": "HS256"}, claims(), b"")
    for token in (hs256(claims()), signed_with_nothing, "x.y.z"):
        assert await refused(auth, bearer(token)) == NO_CUSTOMER_TOKENS


# --- customer JWTs against a JWKS -------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
    )


@pytest.fixture(scope="module")
async def jwks_base(keys: Keys) -> AsyncIterator[str]:
    """A real JWKS endpoint on 127.0.0.1, plus a route that answers something that is not JSON."""
    rsa_jwk = RSAAlgorithm.to_jwk(keys.rsa.public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(keys.ec.public_key(), as_dict=True)
    key_set = {
        "keys": [
            rsa_jwk | {"kid": "rsa-1", "use": "sig", "alg": "RS256"},
            ec_jwk | {"kid": "ec-1", "use": "sig", "alg": "ES256"},
        ]
    }

    async def serve_keys(_: web.Request) -> web.Response:
        return web.json_response(key_set)

    async def serve_garbage(_: web.Request) -> web.Response:
        return web.Response(text="<html>maintenance</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/jwks.json", serve_keys)
    app.router.add_get("/garbage", serve_garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest.fixture
def jwks_auth(jwks_base: str) -> Authenticator:
    return Authenticator(make_settings(customer_jwks_url=f"{jwks_base}/jwks.json"))


def rs256(keys: Keys, payload: dict[str, Any], kid: str = "rsa-1") -> str:
    return jwt.encode(payload, keys.rsa, algorithm="RS256", headers={"kid": kid})


def es256(keys: Keys, payload: dict[str, Any], kid: str = "ec-1") -> str:
    return jwt.encode(payload, keys.ec, algorithm="ES256", headers={"kid": kid})


async def test_rs256_and_es256_tokens_verify_against_the_jwks(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    expected = Caller(CallerKind.CUSTOMER, user_id="user-42", email="ada@example.com")
    assert await jwks_auth.authenticate(bearer(rs256(keys, claims()))) == expected
    assert await jwks_auth.authenticate(bearer(es256(keys, claims()))) == expected


async def test_jwks_tokens_still_have_their_claims_checked(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    assert "expired" in await refused(
        jwks_auth, bearer(rs256(keys, claims(exp=int(time.time()) - 120)))
    )
    assert "'sub'" in await refused(jwks_auth, bearer(es256(keys, claims(without=("sub",)))))


async def test_a_token_signed_by_a_key_outside_the_jwks_is_unauthorized(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"})
    assert "badly signed" in await refused(jwks_auth, bearer(forged))
    assert "kid" in await refused(jwks_auth, bearer(rs256(keys, claims(), kid="rsa-unknown")))
    no_kid = jwt.encode(claims(), keys.rsa, algorithm="RS256")
    assert "kid" in await refused(jwks_auth, bearer(no_kid))


async def test_a_token_whose_alg_differs_from_its_keys_is_unauthorized(
    jwks_auth: Authenticator, keys: Keys
) -> None:
    # An ES256 token naming the RSA key: the key's own algorithm decides, not the header.
    await refused(jwks_auth, bearer(es256(keys, claims(), kid="rsa-1")))


@pytest.mark.parametrize(
    "with_secret", [pytest.param(False, id="jwks-only"), pytest.param(True, id="jwks-and-secret")]
)
async def test_algorithm_confusion_is_unauthorized(
    jwks_base: str, keys: Keys, with_secret: bool
) -> None:
    """HS256 "signed" with the RSA public key, which anyone can download from the JWKS."""
    auth = Authenticator(
        make_settings(
            customer_jwks_url=f"{jwks_base}/jwks.json",
            customer_jwt_secret=JWT_SECRET if with_secret else None,
        )
    )
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = hand_signed({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), public_pem)
    await refused(auth, bearer(token))
    if with_secret:
        # The same configuration still takes a genuine HS256 token and a genuine RS256 one.
        assert (await auth.authenticate(bearer(hs256(claims())))).user_id == "user-42"
        assert (await auth.authenticate(bearer(rs256(keys, claims())))).user_id == "user-42"


async def test_asymmetric_tokens_are_refused_without_a_jwks(
    auth: Authenticator, keys: Keys
) -> None:
    assert "accepted: HS256" in await refused(auth, bearer(rs256(keys, claims())))


@pytest.mark.parametrize("where", ["down", "not-found", "not-json"])
async def test_an_unreadable_jwks_is_unavailable_and_logged(
    jwks_base: str, keys: Keys, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The identity provider's fault, not the token's: 503, which clients retry, not 401."""
    url = {
        "down": f"http://127.0.0.1:{free_port()}/jwks.json",
        "not-found": f"{jwks_base}/nothing-here",
        "not-json": f"{jwks_base}/garbage",
    }[where]
    auth = Authenticator(make_settings(customer_jwks_url=url))
    caplog.set_level(logging.INFO, logger="api.auth")
    token = rs256(keys, claims())
    with pytest.raises(Unavailable) as first:
        await auth.authenticate(bearer(token))
    assert "CUSTOMER_JWKS_URL" in first.value.message
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    # Within the retry window the next request is answered at once, the same way.
    with pytest.raises(Unavailable):
        await auth.authenticate(bearer(token))
    await auth.aclose()


async def test_keys_fetched_before_keep_working_while_the_jwks_is_down(keys: Keys) -> None:
    """A key set fetched once, then the identity provider goes away and the cache expires:
    customers with those keys are still served; a key never seen is 503."""
    rsa_jwk = RSAAlgorithm.to_jwk(keys.rsa.public_key(), as_dict=True)

    async def serve_keys(_: web.Request) -> web.Response:
        return web.json_response({"keys": [rsa_jwk | {"kid": "rsa-1", "alg": "RS256"}]})

    app = web.Application()
    app.router.add_get("/jwks.json", serve_keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    auth = Authenticator(make_settings(customer_jwks_url=f"http://{host}:{port}/jwks.json"))
    assert (await auth.authenticate(bearer(rs256(keys, claims())))).user_id == "user-42"
    await runner.cleanup()
    assert auth._jwks is not None and auth._jwks.jwk_set_cache is not None
    auth._jwks.jwk_set_cache.lifespan = 0  # expired: the next request fetches again

    caller = await auth.authenticate(bearer(rs256(keys, claims())))

    assert caller.user_id == "user-42"
    with pytest.raises(Unavailable):
        await auth.authenticate(bearer(rs256(keys, claims(), kid="rsa-2")))
    await auth.aclose()


# --- what routes ask of a caller, and what is logged ------------------------------------------


async def test_require_admin(auth: Authenticator) -> None:
    auth.require_admin(await auth.authenticate(bearer(ADMIN_TOKEN)))
    with pytest.raises(Unauthorized):
        auth.require_admin(await auth.authenticate(None))
    for credential in (hs256(claims()), auth.order_token(ORDER_A)):
        with pytest.raises(Forbidden):
            auth.require_admin(await auth.authenticate(bearer(credential)))


async def test_refusals_log_the_kind_and_reason_but_never_a_token_or_secret(
    jwks_auth: Authenticator, auth: Authenticator, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = [
        ADMIN_TOKEN + "x",
        _flip(auth.order_token(ORDER_A), -1),
        hs256(claims(), secret="another-customer-secret-0123456789abcdef"),
        hs256(claims(exp=int(time.time()) - 120)),
        hand_signed({"alg": "none"}, claims(), None),
    ]
    for token in tokens:
        await refused(auth, bearer(token))
    await refused(jwks_auth, bearer(rs256(keys, claims(), kid="rsa-unknown")))
    logged = caplog.text
    assert "refused order credential" in logged
    assert "refused customer credential: customer token has expired" in logged
    for text in (ADMIN_TOKEN, SECRET_KEY, JWT_SECRET):
        assert text not in logged
    # Not a whole token, nor any of a JWT's parts (header, claims, signature).
    for token in tokens:
        for part in token.split("."):
            assert len(part) < 8 or part not in logged


@pytest.mark.parametrize("sub", ["u\x00-1", "\ud800"], ids=["nul", "lone-surrogate"])
async def test_a_sub_postgresql_cannot_store_is_refused(auth: Authenticator, sub: str) -> None:
    # PyJWT encodes the lone surrogate as a JSON escape; it decodes back to the surrogate.
    token = hs256(claims(sub=sub)) if sub != "\ud800" else _with_sub_escape(r"\ud800")
    with pytest.raises(Unauthorized):
        await auth.authenticate(bearer(token))


def _with_sub_escape(escape: str) -> str:
    """An HS256 token whose payload JSON holds `escape` verbatim as its sub."""
    now = int(time.time())
    payload = ('{"sub": "' + escape + '", "exp": ' + str(now + 300) + "}").encode()
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = f"{header}.{b64(payload)}"
    signature = hmac.new(JWT_SECRET.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{b64(signature)}"


@pytest.mark.parametrize(
    ("header", "guessable"),
    [
        ("Bearer some-admin-token", True),
        ("bearer   padded-token  ", True),
        (f"Bearer {ORDER_TOKEN_PREFIX}AAAA", False),
        ("Bearer header.payload.signature", False),
        ("Basic dXNlcjpwYXNz", False),
        ("Bearer ", False),
    ],
)
def test_only_a_token_that_could_be_the_admin_token_counts_as_a_guess(
    header: str, guessable: bool
) -> None:
    assert Authenticator.guessable(header) is guessable
