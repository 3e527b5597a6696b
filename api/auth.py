"""Who is calling: the one `Authorization: Bearer <token>` header, read as one of three kinds.

- admin: `ADMIN_TOKEN`;
- order: the access token `POST /checkout` returns, `ot_` + base64url(order id + HMAC), which
  reaches that one order; it needs no storage and nobody without `SECRET_KEY` can make one;
- customer: a JWT from the shop's identity provider (HS256 under `CUSTOMER_JWT_SECRET`, or
  RS256/ES256 against `CUSTOMER_JWKS_URL`).

No header at all is a guest; anything else that does not verify is `Unauthorized`. Which kind
may use which route is the routes' business (`require_admin` for the admin ones). Tokens and
secrets are never logged: a refusal logs the credential's kind and the reason only.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from hashlib import sha256
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from api.schemas import storable
from core.errors import Forbidden, Unauthorized, Unavailable
from core.settings import Settings

log = logging.getLogger(__name__)

ORDER_TOKEN_PREFIX = "ot_"  # noqa: S105 (a prefix, not a secret)
# Domain separation: other keys derived from SECRET_KEY (the replay encryption key) never
# coincide with this one, so no other signature of ours doubles as an order token.
_ORDER_TOKEN_INFO = b"checkout-saga/order-access-token/v1"
# 16 bytes of order id + 32 of HMAC-SHA256 = 48 bytes: exactly 64 base64url characters with no
# padding and no spare bits, so each token has one spelling only.
_ORDER_TOKEN_BODY = re.compile(r"[A-Za-z0-9_-]{64}")

# Explicit allow-lists, one per key source: an HS256 token is only ever checked against the
# shared secret, so a JWKS public key can never be used as an HMAC secret (algorithm confusion),
# and `none` is in neither.
SECRET_ALGORITHMS = ("HS256",)
JWKS_ALGORITHMS = ("RS256", "ES256")
JWT_LEEWAY_SECONDS = 30
JWKS_TIMEOUT_SECONDS = 5.0
# After a failed JWKS fetch, refuse at once for this long instead of trying again per request:
# while the endpoint hangs, every attempt would hold a worker thread for the whole timeout.
JWKS_RETRY_AFTER_SECONDS = 5.0
# The orders table keeps a customer's user id in a VARCHAR(255).
MAX_USER_ID_LENGTH = 255

NO_CUSTOMER_TOKENS = "customer tokens are not accepted: no CUSTOMER_JWT_SECRET or CUSTOMER_JWKS_URL"
JWKS_UNAVAILABLE = (
    "customer token could not be verified: the key set at CUSTOMER_JWKS_URL cannot be read"
)

_JWT_REASONS: dict[type[jwt.PyJWTError], str] = {
    jwt.ExpiredSignatureError: "customer token has expired",
    jwt.ImmatureSignatureError: "customer token is not valid yet",
    jwt.InvalidAudienceError: "customer token is for another audience",
    jwt.InvalidIssuerError: "customer token is from another issuer",
    jwt.InvalidSignatureError: "customer token is badly signed",
}


def _fetched_before(jwks: jwt.PyJWKClient, token: str) -> jwt.PyJWK:
    """The token's key from the last key set fetched, however old; else 503 `unavailable`."""
    stored = jwks.jwk_set_cache.jwk_set_with_timestamp if jwks.jwk_set_cache else None
    if stored is not None:
        kid = jwt.get_unverified_header(token).get("kid")
        for key in stored.get_jwk_set().keys:
            if key.key_id == kid:
                return key
    raise Unavailable(JWKS_UNAVAILABLE)


class CallerKind(StrEnum):
    GUEST = "guest"
    ADMIN = "admin"
    CUSTOMER = "customer"
    ORDER = "order"


@dataclass(frozen=True)
class Caller:
    kind: CallerKind
    user_id: str | None = None  # customer: the JWT's `sub`
    email: str | None = None  # customer: the JWT's `email`, if it has one
    order_id: uuid.UUID | None = None  # order token: the one order it reaches

    @property
    def is_admin(self) -> bool:
        return self.kind is CallerKind.ADMIN


GUEST = Caller(CallerKind.GUEST)
ADMIN = Caller(CallerKind.ADMIN)


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (the scheme in any case,
    spaces around either ignored); None if the value is not that."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _refused(kind: str, reason: str) -> Unauthorized:
    log.info("refused %s credential: %s", kind, reason)
    return Unauthorized(reason)


def _jwt_reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"customer token lacks the {exc.claim!r} claim"
    return _JWT_REASONS.get(type(exc), "customer token is malformed or not valid")


class Authenticator:
    """Reads the bearer header into a `Caller`; built once from the settings."""

    def __init__(self, settings: Settings) -> None:
        self._admin_token = settings.admin_token.get_secret_value().encode()
        self._order_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_ORDER_TOKEN_INFO
        ).derive(settings.secret_key.get_secret_value().encode())
        secret = settings.customer_jwt_secret
        self._jwt_secret = secret.get_secret_value() if secret is not None else ""
        # The JWK Set cache (5 minutes) rather than PyJWT's per-kid cache, which never expires
        # and would keep accepting a key the identity provider has withdrawn.
        self._jwks = (
            jwt.PyJWKClient(settings.customer_jwks_url, timeout=JWKS_TIMEOUT_SECONDS)
            if settings.customer_jwks_url
            else None
        )
        self._jwks_down_until = 0.0
        self._issuer = settings.customer_jwt_issuer or None
        self._audience = settings.customer_jwt_audience or None
        self._required_claims = ["sub", "exp"]
        if self._issuer:
            self._required_claims.append("iss")
        if self._audience:
            self._required_claims.append("aud")

    async def authenticate(self, authorization: str | None) -> Caller:
        """The caller behind an `Authorization` header value (None: no header, a guest)."""
        if authorization is None:
            return GUEST
        token = bearer_token(authorization)
        if token is None:
            raise _refused("bearer", "expected 'Authorization: Bearer <token>'")
        if hmac.compare_digest(token.encode(), self._admin_token):
            return ADMIN
        if token.startswith(ORDER_TOKEN_PREFIX):
            return self._order_caller(token)
        if token.count(".") == 2:
            return await self._customer_caller(token)
        raise _refused("bearer", "unknown bearer token")

    @staticmethod
    def guessable(authorization: str) -> bool:
        """Whether this header's credential, if refused, may be a guess at a secret: a bearer
        token that is neither an order token nor a JWT, i.e. the admin token (an operator's
        choice). An order token is 256 bits of HMAC and a JWT carries a signature: neither can
        be guessed, and a refused one (an expired JWT, say) is no attack."""
        token = bearer_token(authorization)
        return (
            token is not None and not token.startswith(ORDER_TOKEN_PREFIX) and token.count(".") != 2
        )

    def order_token(self, order_id: uuid.UUID) -> str:
        """The access token of one order: the same every time, so a replay returns it again."""
        raw = order_id.bytes + self._order_mac(order_id.bytes)
        return ORDER_TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def require_admin(self, caller: Caller) -> None:
        """No credential: 401; a valid credential of another kind: 403."""
        if caller.kind is CallerKind.GUEST:
            raise Unauthorized("this route needs the admin token")
        if not caller.is_admin:
            raise Forbidden(f"a {caller.kind} credential cannot use this route")

    async def aclose(self) -> None:
        """Nothing to release: PyJWKClient opens a fresh connection for each fetch."""

    def _order_mac(self, order_bytes: bytes) -> bytes:
        return hmac.new(self._order_key, order_bytes, sha256).digest()

    def _order_caller(self, token: str) -> Caller:
        body = token[len(ORDER_TOKEN_PREFIX) :]
        if not _ORDER_TOKEN_BODY.fullmatch(body):
            raise _refused("order", "malformed order access token")
        raw = base64.urlsafe_b64decode(body)
        order_bytes, mac = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, self._order_mac(order_bytes)):
            raise _refused("order", "order access token is not valid")
        return Caller(CallerKind.ORDER, order_id=uuid.UUID(bytes=order_bytes))

    async def _customer_caller(self, token: str) -> Caller:
        if not self._jwt_secret and self._jwks is None:
            raise _refused("customer", NO_CUSTOMER_TOKENS)
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise _refused("customer", "customer token is malformed") from None
        key: str | jwt.PyJWK
        algorithms: tuple[str, ...]
        if alg in SECRET_ALGORITHMS and self._jwt_secret:
            key, algorithms = self._jwt_secret, SECRET_ALGORITHMS
        elif alg in JWKS_ALGORITHMS and self._jwks is not None:
            key, algorithms = await self._jwks_key(self._jwks, token), JWKS_ALGORITHMS
        else:
            # The header's alg is the caller's text: named only through what is accepted.
            accepted = (SECRET_ALGORITHMS if self._jwt_secret else ()) + (
                JWKS_ALGORITHMS if self._jwks is not None else ()
            )
            raise _refused(
                "customer",
                f"customer token algorithm not accepted (accepted: {', '.join(accepted)})",
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=JWT_LEEWAY_SECONDS,
                # Without a configured audience PyJWT would refuse any token carrying `aud`.
                options={"require": self._required_claims, "verify_aud": bool(self._audience)},
            )
        except jwt.PyJWTError as exc:
            raise _refused("customer", _jwt_reason(exc)) from exc
        sub, email = claims["sub"], claims.get("email")
        if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_USER_ID_LENGTH:
            raise _refused(
                "customer",
                "customer token's 'sub' must be a non-blank string of at most"
                f" {MAX_USER_ID_LENGTH} characters",
            )
        if email is not None and not isinstance(email, str):
            raise _refused("customer", "customer token's 'email' must be a string")
        try:
            # The sub becomes the order's customer.user_id: text PostgreSQL can store.
            storable(sub)
            storable(email or "")
        except ValueError as exc:
            raise _refused("customer", f"customer token's claims {exc}") from None
        return Caller(CallerKind.CUSTOMER, user_id=sub, email=email or None)

    async def _jwks_key(self, jwks: jwt.PyJWKClient, token: str) -> jwt.PyJWK:
        """The JWKS key the token's `kid` names; the fetch is blocking urllib, so off the loop.

        While the key set cannot be fetched, keys fetched before keep working (an identity
        provider's outage must not sign every customer out), and a token whose key was never
        fetched is 503 `unavailable`: the service, not the token, is at fault."""
        if time.monotonic() < self._jwks_down_until:
            return _fetched_before(jwks, token)
        try:
            return await asyncio.to_thread(jwks.get_signing_key_from_jwt, token)
        # Unreachable, an HTTP error, a timeout, or a body that is not JSON (PyJWT lets
        # json's ValueError and a reset connection's OSError through).
        except (jwt.PyJWKClientConnectionError, OSError, ValueError) as exc:
            self._jwks_down_until = time.monotonic() + JWKS_RETRY_AFTER_SECONDS
            log.warning("fetching CUSTOMER_JWKS_URL failed (%s): %s", type(exc).__name__, exc)
            return _fetched_before(jwks, token)
        except jwt.PyJWTError as exc:
            raise _refused(
                "customer", "customer token's key (kid) is not in the key set at CUSTOMER_JWKS_URL"
            ) from exc
