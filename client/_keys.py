"""API keys as the server stores them: `sha256:<hex>` digests, never the keys themselves."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "td_"


def hash_api_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)
