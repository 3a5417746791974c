"""The relay's byte-level chunk rewrite (server/serving/chunk_rewrite.py) against its full-parse path: for every
chunk shape the engine sends, both give the client the same JSON and count the same usage. A unit test of one
module; the relay against the real engine is covered in test_serving.py and test_metrics.py."""

from __future__ import annotations

import json

import httpx
import pytest

from server.observability.metrics import Metrics, RequestRecorder
from server.serving.chunk_rewrite import ChunkRewriter
from server.serving.relay import _Once, _StreamRelay
from server.serving.tenancy import ModelRoute
from server.wire.openai import ChatCompletionRequest

ENGINE = "alpha--support--v3"
USAGE = {"prompt_tokens": 7, "total_tokens": 9, "completion_tokens": 2}
TRICKY = 'say "model":"x", then ,"usage":{"prompt_tokens":1} and "choices":[] and "error": \\ é 😀'


def chunk(content: str | None = "hi", *, usage: dict | None = USAGE, tool: bool = False) -> str:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "logprobs": None,
                                           "finish_reason": None}]
    if tool:
        choices[0]["delta"] = {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {
            "name": "get", "arguments": '{"model": "x", "usage": 1}'}}]}
    event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": ENGINE,
             "choices": choices, "usage": usage}  # the gateway asks for usage on every chunk
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


CHUNKS = [chunk(), chunk(TRICKY), chunk(tool=True), chunk(None), chunk(usage=None),
          chunk("x", usage={"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8,
                            "prompt_tokens_details": None})]


def relay(stream_options: dict | None, *, fast: bool) -> _StreamRelay:
    request = ChatCompletionRequest(model="support", messages=[{"role": "user", "content": "hi"}], stream=True,
                          stream_options=stream_options)
    recorder = RequestRecorder(Metrics(), 0.0, "alpha", "chat")
    made = _StreamRelay(httpx.Response(200), ModelRoute("support", ENGINE), request, recorder, _Once(lambda: None))
    if not fast:
        made._rewriter = None
    return made


@pytest.mark.parametrize("stream_options", [None, {"include_usage": True},
                                            {"include_usage": True, "continuous_usage_stats": True}])
def test_the_byte_rewrite_gives_what_the_full_parse_gives(stream_options):
    fast, slow = relay(stream_options, fast=True), relay(stream_options, fast=False)
    assert fast._rewriter is not None
    for data in CHUNKS:
        assert fast._rewriter.rewrite(data) is not None, data  # the fast path took it
        got, want = fast._relayed(data), slow._relayed(data)
        assert (got is None) == (want is None), data
        if want is not None:
            assert got.startswith(b"data: ") and got.endswith(b"\n\n")
            assert json.loads(got[6:]) == json.loads(want[6:]), data
            assert ENGINE.encode() not in got
        assert (fast.recorder.prompt_tokens, fast.recorder.completion_tokens) == \
            (slow.recorder.prompt_tokens, slow.recorder.completion_tokens)


def test_chunks_the_byte_rewrite_does_not_know_are_left_to_the_full_parse():
    rewriter = ChunkRewriter(ENGINE, "support", usage_on_every_chunk=False, usage_at_end=True)
    error = json.dumps({"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
    other_model = chunk().replace(ENGINE, "beta--legal--v1")
    usage_first = json.dumps({"usage": USAGE, "model": ENGINE, "choices": []}, separators=(",", ":"))
    no_choices = json.dumps({"model": ENGINE, "usage": USAGE}, separators=(",", ":"))
    assert rewriter.rewrite(chunk()) is not None
    for data in (error, other_model, usage_first, no_choices, chunk()[:-5]):
        assert rewriter.rewrite(data) is None, data


def test_a_stream_of_several_sequences_is_parsed_whole():
    """Its per-choice usage is summed by choice index, which the byte path does not read."""
    request = ChatCompletionRequest(model="support", messages=[{"role": "user", "content": "hi"}], stream=True, n=2)
    recorder = RequestRecorder(Metrics(), 0.0, "alpha", "chat")
    made = _StreamRelay(httpx.Response(200), ModelRoute("support", ENGINE), request, recorder, _Once(lambda: None))
    assert made._rewriter is None
