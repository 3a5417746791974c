"""An engine's streamed chunk rewritten for its client without decoding it whole.

A relayed chat or completions chunk needs two edits: the engine-side model name becomes the client's, and the
usage the gateway asked for on every chunk is read (for metrics and quotas) and dropped unless the client wants it.
Both are top-level keys of a JSON object whose other values are strings, numbers and arrays of objects with
fixed keys, so a byte-level edit is exact: inside a JSON string every `"` is escaped (`\\"`), so the raw text
`"model":"` or `,"usage":` can only be a key. The model field holds a name the gateway made
(`tenant--adapter--vN`, server/serving/tenancy.py), which needs no escaping. Only the usage object is decoded.

Anything unexpected (no model field, an `"error"` key, a usage object that does not decode) returns None and the
relay parses that chunk in full, as it did for every chunk before: this is a fast path, never the only path.
"""

from __future__ import annotations

import json
from typing import NamedTuple

_DECODER = json.JSONDecoder()
_USAGE = ',"usage":'


class Chunk(NamedTuple):
    text: str  # the chunk as the client sees it
    usage: dict | None  # what the engine reported on it
    has_choices: bool  # False on the closing usage-only chunk


class ChunkRewriter:
    """Rewrites the chunks of one stream from `engine_model` to `client_model`, keeping the usage on chunks with
    choices only when `usage_on_every_chunk`, and on the closing usage-only chunk only when `usage_at_end`."""

    def __init__(self, engine_model: str, client_model: str, *, usage_on_every_chunk: bool, usage_at_end: bool):
        self._engine_field = f'"model":{json.dumps(engine_model)}'
        self._client_field = f'"model":{json.dumps(client_model, ensure_ascii=False)}'
        self._usage_on_every_chunk, self._usage_at_end = usage_on_every_chunk, usage_at_end

    def rewrite(self, data: str) -> Chunk | None:
        """`data` (one SSE event's JSON) for the client, or None when the caller must parse it whole."""
        if '"error"' in data:
            return None
        head, found, tail = data.partition(self._engine_field)
        if not found or self._engine_field in tail or '"usage":' in head or '"choices":[' not in data:
            return None
        has_choices = '"choices":[]' not in data
        usage = None
        at = tail.rfind(_USAGE)
        if at >= 0:
            try:
                usage, end = _DECODER.raw_decode(tail, at + len(_USAGE))
            except ValueError:
                return None
            if usage is not None and not isinstance(usage, dict):
                return None
            if not (self._usage_on_every_chunk if has_choices else self._usage_at_end):
                tail = tail[:at] + tail[end:]
        elif '"usage":' in tail:
            return None
        return Chunk(head + self._client_field + tail, usage, has_choices)
