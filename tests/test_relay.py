"""The stream relay on its own, fed by a scripted engine stream (a unit test of one module; the relay against
the real engine is covered in test_serving.py and test_metrics.py)."""

from __future__ import annotations

import asyncio
import json

from server.observability.metrics import Metrics, RequestRecorder
from server.serving.relay import _Once, _StreamRelay
from server.serving.tenancy import ModelRoute
from server.wire.openai import CompletionRequest

GUARD = 60.0


class ScriptedStream:
    """Stands in for server.engine.client.EngineStream: the engine's SSE events, then silence (the engine has
    sent [DONE] but not yet closed the connection)."""

    status = 200

    def __init__(self, events: list[bytes]):
        self.events = events

    async def lines(self):
        for event in self.events:
            for line in event.split(b"\n")[:-1]:
                yield line
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass


def test_a_client_that_leaves_right_after_done_is_counted_as_served():
    """Guards the CI failure of test_metrics.py (a whole streamed answer counted as 499): a client that reads
    `data: [DONE]` and hangs up at once made the gateway cancel the relay before the engine's connection ended,
    and the request was recorded as a disconnect. [DONE] is the engine's word that the answer is whole."""
    chunk = {"id": "c", "object": "text_completion", "model": "engine-name",
             "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    response = ScriptedStream([b"data: " + json.dumps(chunk).encode() + b"\n\n",
                                b"data: [DONE]\n\n"])
    recorder = RequestRecorder(Metrics(), 0.0, "tenant", "completions")
    request = CompletionRequest(model="m", prompt="x", stream=True)
    relay = _StreamRelay(response, ModelRoute("m", "engine-name"), request, recorder, _Once(lambda: None))

    async def client_reads_to_done_and_leaves():
        events = relay.events()
        async for event in events:
            if event == b"data: [DONE]\n\n":
                break
        await events.aclose()  # what the server does to the relay when the client has gone

    asyncio.run(asyncio.wait_for(client_reads_to_done_and_leaves(), GUARD))
    assert recorder.status == 200
    assert (recorder.prompt_tokens, recorder.completion_tokens) == (3, 1)


def test_a_client_that_leaves_before_done_is_a_499():
    """The other side of the rule above: a stream left before [DONE] stays a disconnect."""
    chunk = {"id": "c", "object": "text_completion", "model": "engine-name",
             "choices": [{"index": 0, "text": "hi", "finish_reason": None}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    response = ScriptedStream([b"data: " + json.dumps(chunk).encode() + b"\n\n"])
    recorder = RequestRecorder(Metrics(), 0.0, "tenant", "completions")
    request = CompletionRequest(model="m", prompt="x", stream=True)
    relay = _StreamRelay(response, ModelRoute("m", "engine-name"), request, recorder, _Once(lambda: None))

    async def client_reads_one_event_and_leaves():
        events = relay.events()
        await events.__anext__()
        await events.aclose()

    asyncio.run(asyncio.wait_for(client_reads_one_event_and_leaves(), GUARD))
    assert recorder.status == 499

