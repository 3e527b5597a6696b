"""Values the service keeps but must not store in clear (a PaymentIntent's client_secret),
encrypted under a key derived from SECRET_KEY (Fernet: AES-128-CBC with an HMAC-SHA256)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken

# Domain separation: the same SECRET_KEY signs order access tokens for another purpose.
_LABEL = b"checkout-saga/client-secret-seal/v1"


class Sealer:
    def __init__(self, secret_key: str) -> None:
        key = hmac.new(secret_key.encode(), _LABEL, hashlib.sha256).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def unseal(self, sealed: str | None) -> str | None:
        """The value, or None if there is none or it was sealed under another SECRET_KEY
        (the caller asks Stripe instead)."""
        if not sealed:
            return None
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            return None
