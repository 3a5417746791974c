"""A real Redis server for the tests: Debian's `redis-server` on a free loopback port, emptied before each test
that asks for `redis_url`, stopped at the end of the session (also after a failure). Its append-only file keeps
what it holds across a `stop` and `start`, as a production Redis that restarts would.

Load the fixtures with `pytest_plugins = ["tests.redis_server"]` in a test module. `make test` installs the
package; without it the tests fail, they do not skip.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port

START_TIMEOUT = 60


class RedisServer:
    """One redis-server process; `stop` and `start` again on the same port (a store that goes away and
    comes back)."""

    def __init__(self, root: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: install Debian's `redis-server` package (`make test` does).",
                        pytrace=False)
        self.binary, self.root, self.port = binary, root, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always",
             "--dir", str(self.root)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=2) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server did not start:\n{self.log_tail()}", pytrace=False)
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10, decode_responses=True)

    def log_tail(self) -> str:
        log = self.root / "redis.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    root = Path(tempfile.mkdtemp(prefix="loraserve-redis-"))
    server = RedisServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, running and empty."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a test that stopped it failed before starting it again
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url
