"""Bearer API keys. Keys never sit in the serving config: they come from the environment or a file.

- `HELIOS_API_KEYS`: comma-separated keys; with `auth.api_keys_file` (one key a line, `#` comments)
  the two sets add up. With no key at all, `/v1` is open (the server binds 127.0.0.1 by default).
- `HELIOS_ADMIN_KEY`: the one key of `/admin/...`, which is off unless `auth.admin_routes` is on.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

API_KEYS_ENV = "HELIOS_API_KEYS"
ADMIN_KEY_ENV = "HELIOS_ADMIN_KEY"


def load_api_keys(keys_file: str | None, environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """The keys accepted on `/v1` routes (empty: no key needed)."""
    keys = {key.strip() for key in environ.get(API_KEYS_ENV, "").split(",")}
    if keys_file:
        for line in Path(keys_file).expanduser().read_text().splitlines():
            keys.add(line.split("#", 1)[0].strip())
    return frozenset(key for key in keys if key)


def load_admin_key(environ: Mapping[str, str] = os.environ) -> str:
    """The admin key; admin routes need one, so asking for them without it is an error at start-up."""
    key = environ.get(ADMIN_KEY_ENV, "").strip()
    if not key:
        raise ValueError(f"auth.admin_routes is on but {ADMIN_KEY_ENV} is not set: admin routes need their own key")
    return key


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer ...` header in raw ASGI headers."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def key_accepted(token: str | None, keys: frozenset[str]) -> bool:
    """Constant-time comparison against every key, so timing does not reveal a key's prefix."""
    if token is None:
        return False
    given = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched
