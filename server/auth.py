"""API keys and origins. Keys are compared in constant time; a browser may send its key as the
`openai-insecure-api-key.<key>` WebSocket subprotocol, as OpenAI's own browser clients do."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

from pydantic import SecretStr

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def key_matches(candidate: str | None, keys: Sequence[SecretStr]) -> bool:
    if not candidate:  # no key, or an empty one, never matches (not even an empty configured key)
        return False
    given = candidate.encode()
    # Compare against every key (no early exit), so timing says nothing about which key is close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.get_secret_value().encode())
    return matched


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def subprotocol_key(subprotocols: Iterable[str]) -> str | None:
    for proto in subprotocols:
        if proto.startswith(KEY_SUBPROTOCOL_PREFIX):
            return proto[len(KEY_SUBPROTOCOL_PREFIX) :]
    return None


def origin_allowed(origin: str | None, allowed: Sequence[str]) -> bool:
    """No allow-list: any origin. Non-browser clients send no Origin header and are let through."""
    if not allowed or origin is None:
        return True
    return origin.rstrip("/") in {a.rstrip("/") for a in allowed} or "*" in allowed
