"""The engine client's timeouts and retries on its own, against small HTTP servers on loopback: a long
non-streamed request is not a stalled one, a stalled engine still fails it, a stream keeps its stall timeout,
a dropped keep-alive connection is retried once, and a stream's lines come whole however the bytes are cut.

Every wait is bounded by `asyncio.wait_for(..., GUARD)`, generous, so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from server.engine.client import EngineClient
from server.errors import EngineUnavailable, EngineUnreachable

GUARD = 60.0
BODY = b'{"ok": true}'


class LoopbackServer:
    """`async with Server() as url:` an HTTP server on a free loopback port; subclasses answer in `_serve`."""

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """One request off the connection: its request line and its body (Content-Length framed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    request_line, *headers = head.decode().split("\r\n")
    length = next((int(h.split(":")[1]) for h in headers if h.lower().startswith("content-length")), 0)
    return request_line, await reader.readexactly(length)


class SlowEngine(LoopbackServer):
    """Answers `POST` after `delay` seconds (None: never), `/health` at once unless `stalled`; a stream
    sends its headers and one event, then nothing."""

    def __init__(self, delay: float | None, stalled: bool = False):
        self.delay, self.stalled = delay, stalled
        self.hang = asyncio.Event()  # never set: a stalled engine's silence

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line, body = await read_request(reader)
                if request_line.startswith("GET /health"):
                    if self.stalled:
                        await self.hang.wait()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                elif b'"stream": true' in body or b'"stream":true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    event = b"data: {}\n\n"
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    await self.hang.wait()
                else:
                    if self.delay is None:
                        await self.hang.wait()
                    await asyncio.sleep(self.delay)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, GUARD))


def test_a_long_non_streamed_request_outlives_the_read_timeout():
    """Guards the flake in test_batching (503 'did not answer in time' on a busy machine): a non-streamed
    request sends no byte until done, so the stall timeout must not cut it. Failed before the fix (the
    read timeout ended it after 0.3 s); passes now, the engine's /health answering meanwhile."""
    async def go():
        async with SlowEngine(delay=1.5) as url:
            client = EngineClient(url, read_timeout=0.3, liveness_interval=0.1)
            try:
                return await client.complete("/v1/completions", {"prompt": "hi"})
            finally:
                await client.aclose()

    reply = run(go())
    assert reply.status == 200 and reply.json() == {"ok": True}


def test_a_stalled_engine_fails_a_waiting_non_streamed_request():
    """The engine stops answering anything (SIGSTOP): the liveness probe times out and the request fails
    with a 503 long before the total deadline. (Passed before the fix too, by the read timeout.)"""
    async def go():
        async with SlowEngine(delay=None, stalled=True) as url:
            client = EngineClient(url, read_timeout=0.3, request_timeout=3600, liveness_interval=0.1)
            try:
                await client.complete("/v1/completions", {"prompt": "hi"})
            finally:
                await client.aclose()

    with pytest.raises(EngineUnavailable, match="did not answer in time"):
        run(go())


def test_a_non_streamed_request_has_a_total_deadline():
    """A live engine that never finishes is cut at `request_timeout`. Failed before the fix (there was no
    such deadline: the call waited for as long as the read timeout allowed, here an hour)."""
    async def go():
        async with SlowEngine(delay=None) as url:
            client = EngineClient(url, read_timeout=3600, request_timeout=0.5, liveness_interval=0.1)
            try:
                await client.complete("/v1/completions", {"prompt": "hi"})
            finally:
                await client.aclose()

    with pytest.raises(EngineUnavailable, match="did not answer in time"):
        run(go())


def test_a_stream_keeps_its_stall_timeout():
    """A stream that stops sending is cut by the read timeout, whatever the liveness (guard; passed before)."""
    async def go():
        async with SlowEngine(delay=0) as url:
            client = EngineClient(url, read_timeout=0.3, request_timeout=3600, liveness_interval=0.1)
            try:
                response = await client.open_stream("/v1/completions", {"prompt": "hi", "stream": True})
                try:
                    async for _ in response.lines():
                        pass
                finally:
                    await response.aclose()
            finally:
                await client.aclose()

    with pytest.raises(EngineUnavailable, match="did not answer in time"):
        run(go())


class DroppingEngine(LoopbackServer):
    """Reads each request, then closes the connection without a byte of answer (what a keep-alive connection
    the engine closed looks like to the request sent on it) for the first `drops` requests; answers the rest."""

    def __init__(self, drops: int):
        self.drops, self.seen = drops, []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line, _ = await read_request(reader)
                self.seen.append(request_line.split()[1])
                if len(self.seen) <= self.drops:
                    return  # `finally` closes the connection: no answer
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("call", ["complete", "open_stream", "load_adapter"])
def test_a_dropped_keep_alive_connection_is_retried_once(call):
    """Item 11: a stale pooled connection fails before any byte; the request is sent once more on the same
    engine instead of failing (which took the engine out of rotation). Failed before the fix (raised
    EngineUnreachable); passes now."""
    engine = DroppingEngine(drops=1)

    async def go():
        async with engine as url:
            client = EngineClient(url)
            try:
                if call == "load_adapter":
                    return await client.load_adapter("a", "/a")
                result = await getattr(client, call)("/v1/completions", {"prompt": "hi"})
                if call == "open_stream":
                    assert result.status == 200 and await result.aread() == BODY
                    await result.aclose()
                return result
            finally:
                await client.aclose()

    run(go())
    assert len(engine.seen) == 2


def test_a_connection_dropped_twice_means_the_engine_is_gone():
    """Only one retry: the second drop is reported as unreachable (guard)."""
    engine = DroppingEngine(drops=2)

    async def go():
        async with engine as url:
            client = EngineClient(url)
            try:
                await client.complete("/v1/completions", {"prompt": "hi"})
            finally:
                await client.aclose()

    with pytest.raises(EngineUnreachable):
        run(go())
    assert len(engine.seen) == 2


def test_nothing_listening_is_unreachable_at_once():
    """A refused connection is not a stale one: one try, EngineUnreachable (the pool then tries another engine)."""
    async def go():
        async with DroppingEngine(drops=0) as url:
            pass  # closed: the port refuses connections now
        client = EngineClient(url)
        try:
            await client.complete("/v1/completions", {"prompt": "hi"})
        finally:
            await client.aclose()

    with pytest.raises(EngineUnreachable):
        run(go())


class ChoppedStream(LoopbackServer):
    """Sends one streamed answer cut at awkward places: lines split across writes, CRLF and LF line ends, a
    long line, and a last line without its line end."""

    LONG = b"data: " + b"x" * 300_000
    PIECES = (b"data: {\"a\"", b":1}\n\ndata: {\"b\":2}\r\n", b"\r\n" + LONG[:100_000], LONG[100_000:] + b"\n\n",
              b"data: [DONE]")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in self.PIECES:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


def test_a_stream_comes_line_by_line_however_its_bytes_are_cut():
    """The relay reads SSE lines from `lines()`: each whole, without its line end (LF or CRLF), a line longer
    than any read buffer included, and the last one even without a line end."""
    async def go():
        async with ChoppedStream() as url:
            client = EngineClient(url)
            try:
                response = await client.open_stream("/v1/completions", {"prompt": "hi", "stream": True})
                try:
                    return [line async for line in response.lines()]
                finally:
                    await response.aclose()
            finally:
                await client.aclose()

    assert run(go()) == [b'data: {"a":1}', b"", b'data: {"b":2}', b"", ChoppedStream.LONG, b"", b"data: [DONE]"]
