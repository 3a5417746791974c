"""The gateway's own CPU per streamed chunk: the relay's byte-level rewrite against parsing every chunk whole.

    .venv/bin/python bench/relay_cpu.py [--chunks 20000]

Each streamed token is one engine chunk, which the relay rewrites (model name back to the client's, usage read
and dropped or kept) in the one gateway process that also holds the connections. This times that step alone, on
one core, for a vLLM chat chunk with usage on it (the gateway asks for usage on every chunk): `_relayed` with the
byte path (server/serving/chunk_rewrite.py, the default for one-sequence streams) against the same relay with
that path off (every chunk through json.loads and json.dumps, as before). Median of 5 rounds of --chunks calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
from harness import print_table

from server.observability.metrics import Metrics, RequestRecorder
from server.serving.relay import _Once, _StreamRelay
from server.serving.tenancy import ModelRoute
from server.wire.openai import ChatCompletionRequest

ENGINE = "tenant-a--support--v3"


def engine_chunk(content: str) -> str:
    return json.dumps({
        "id": "chatcmpl-6f1c2b9e8a7d4c3b", "object": "chat.completion.chunk", "created": 1764900000,
        "model": ENGINE, "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None,
                                      "finish_reason": None}],
        "usage": {"prompt_tokens": 128, "total_tokens": 140, "completion_tokens": 12}}, separators=(",", ":"))


def relay(stream_options: dict | None, *, fast: bool) -> _StreamRelay:
    request = ChatCompletionRequest(model="support", messages=[{"role": "user", "content": "hi"}], stream=True,
                                    stream_options=stream_options)
    made = _StreamRelay(httpx.Response(200), ModelRoute("support", ENGINE), request,
                        RequestRecorder(Metrics(), 0.0, "tenant-a", "chat"), _Once(lambda: None))
    if not fast:
        made._rewriter = None
    return made


def us_per_chunk(target: _StreamRelay, data: str, chunks: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(chunks):
            target._relayed(data)
        rounds.append((time.process_time() - started) / chunks * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20000)
    args = parser.parse_args()
    rows, data = [], {}
    for label, options in [("usage dropped (no stream_options)", None),
                           ("usage at the end (include_usage)", {"include_usage": True})]:
        for kind, text in (("one word", " the"), ("escapes and non-ASCII", " naïve café, \"quoted\"")):
            chunk = engine_chunk(text)
            slow = us_per_chunk(relay(options, fast=False), chunk, args.chunks)
            fast = us_per_chunk(relay(options, fast=True), chunk, args.chunks)
            name = f"{label}, {kind} ({len(chunk)} B)"
            data[name] = {"full_parse_us": slow, "byte_rewrite_us": fast}
            rows.append([name, f"{slow:.1f}", f"{fast:.1f}", f"{slow / fast:.2f}"])
    print_table(f"The relay's CPU per streamed chunk, one core, median of 5 x {args.chunks} (microseconds)",
                ["chunk", "full parse us", "byte rewrite us", "full / byte"], rows, data)


if __name__ == "__main__":
    main()
