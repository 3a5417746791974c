"""Per-tenant prefix-cache salts: one tenant's prompts never warm (or reveal) another's cache entries.

vLLM's automatic prefix cache is shared by every request on an engine; a tenant that finds its prompt served
from the cache (a shorter time to first token) learns that another tenant sent it recently. Every engine
request therefore carries `cache_salt` = HMAC(secret, tenant): the same tenant keeps its own hits, other
tenants' identical prompts miss. The secret is the operator's (`LORASERVE_CACHE_SALT_SECRET`, the same on
every gateway that shares engines) or, when unset, made once and kept in the data folder. A client never
chooses the salt: from a known salt a tenant could aim at another's entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path


class CacheSalts:
    def __init__(self, secret: bytes):
        self._secret = secret
        self._salts: dict[str, str] = {}

    def for_tenant(self, tenant_id: str) -> str:
        salt = self._salts.get(tenant_id)
        if salt is None:
            salt = hmac.new(self._secret, tenant_id.encode(), hashlib.sha256).hexdigest()
            self._salts[tenant_id] = salt
        return salt


def load_or_create_secret(path: Path) -> bytes:
    """The secret kept at `path`, made (readable by the owner only) on first use. It is written whole to a
    temporary file and linked into place, so a gateway starting beside another never reads half of it."""
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_hex(32).encode())
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another gateway on this folder made it first: use theirs
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_bytes()
