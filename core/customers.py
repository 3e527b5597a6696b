"""Whose checkout is it: the scope an Idempotency-Key and the customer limits count in."""

from __future__ import annotations


def customer_scope(user_id: str | None, email: str) -> str:
    """`user:<sub>` for a signed-in customer (or admin naming a user_id), else the email,
    case-insensitively: the contract's scope of a key, and whose pending checkouts count."""
    return f"user:{user_id}" if user_id else f"email:{email.lower()}"
