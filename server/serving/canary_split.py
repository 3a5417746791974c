"""Which version `NAME` serves a request while the adapter has a canary: the candidate for its `weight` percent
of requests, the active version for the rest.

A request that names a `user` (or sends `X-Request-ID`) is sticky: the same value always lands on the same side
of the split, so one end user does not flip between versions. Without either, each request is drawn at random.
`NAME@N` never comes here: it is version N, exactly.
"""

from __future__ import annotations

import hashlib
import secrets

from server.storage.adapter_records import AdapterView


def serving_version(adapter: AdapterView, sticky: str | None) -> int | None:
    canary = adapter.canary
    if not canary or adapter.active_version is None:
        return adapter.active_version
    candidate = next((v for v in adapter.version_details if v.version == canary["version"]), None)
    if candidate is None or candidate.state == "refused":
        return adapter.active_version
    return candidate.version if split_bucket(adapter, sticky) < canary["weight"] else adapter.active_version


def split_bucket(adapter: AdapterView, sticky: str | None) -> int:
    """0-99: the request's place in the split."""
    if sticky is None:
        return secrets.randbelow(100)
    digest = hashlib.sha256(f"{adapter.tenant_id}\0{adapter.name}\0{sticky}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100
