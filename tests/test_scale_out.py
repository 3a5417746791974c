"""Two real vLLM CPU engines behind one gateway: adapter affinity, failover, and return to rotation.

Engine A is the session's engine; engine B is started here with `loraserve engine`, killed, and
started again. The gateway under test is a second one, in this process, with both engines in
LORASERVE_ENGINE_URLS and its own tenants: 3 tenants with 2 adapters each.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from tests.conftest import (
    ADMIN_KEY,
    ENGINE_START_TIMEOUT,
    REPO,
    free_port,
    make_peft_adapter,
    running_gateway,
    wait_until_ok,
)

CAPACITY = 4  # requests per engine before an adapter's traffic spills over
ADAPTERS = [(tenant, name) for tenant in ("north", "south", "west") for name in ("sales", "ops")]


class Engine:
    """`loraserve engine` in its own process group, on a fixed port so it can come back there."""

    def __init__(self, base_model: Path, data: Path, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ, "LORASERVE_ENGINE_PORT": str(self.port), "LORASERVE_BASE_MODEL_PATH": str(base_model),
            "LORASERVE_DATA_DIR": str(data),
            "LORASERVE_ENGINE_MAX_LORAS": "4",
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "engine"], env=self.env, cwd=REPO, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self) -> None:
        wait_until_ok(f"{self.url}/health", self.process, self.log, timeout=ENGINE_START_TIMEOUT)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def requests_served(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def engine_b(tmp_path_factory, base_model_path):
    engine = Engine(base_model_path, tmp_path_factory.mktemp("engine-b"), tmp_path_factory.mktemp("logs") / "b.log")
    engine.start()
    yield engine
    engine.kill()


@pytest.fixture(scope="module")
def two_engine_gateway(gateway, engine_b, tmp_path_factory, base_model_path):
    settings = Settings(
        _env_file=None, data_dir=tmp_path_factory.mktemp("scale-out"), port=free_port(),
        engine_urls=[gateway.engine_url, engine_b.url], base_model_path=base_model_path, admin_key=ADMIN_KEY,
        engine_capacity=CAPACITY, engine_health_interval=0.5, engine_read_timeout=60,
    )
    folder = tmp_path_factory.mktemp("scale-out-adapters")
    sources = [make_peft_adapter(base_model_path, folder / f"{tenant}-{name}", seed=40 + i)
               for i, (tenant, name) in enumerate(ADAPTERS)]
    engine_b.wait_ready()  # the adapters were made while it started
    with running_gateway(settings) as app:
        services = app.state.services
        keys = {}
        for tenant in dict.fromkeys(t for t, _ in ADAPTERS):
            services.store.create_tenant(tenant)
            keys[tenant] = services.store.create_key(tenant)[1]
        for (tenant, name), source in zip(ADAPTERS, sources, strict=True):
            services.registry.publish(source, tenant, name, origin="test")
        wait_for(lambda: all(slot.up for slot in services.pool.slots), "both engines in rotation")
        yield f"http://127.0.0.1:{settings.port}", services, keys


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def ask(url: str, key: str, model: str, max_tokens: int = 4) -> int:
    """One chat request with the official client; its HTTP status."""
    from openai import APIStatusError, OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say something."}], max_tokens=max_tokens,
            temperature=0,
        )
    except APIStatusError as exc:
        return exc.status_code
    return 200


def traffic(url: str, keys: dict[str, str], rounds: int, concurrency: int = 2) -> list[int]:
    calls = [(tenant, name) for _ in range(rounds) for tenant, name in ADAPTERS]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda call: ask(url, keys[call[0]], call[1]), calls))


def loads_by_engine(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).text
    found = re.findall(r'^loraserve_adapter_loads_total\{engine="([^"]+)"\} (\S+)$', text, re.M)
    return {engine: float(count) for engine, count in found}


def ours(slot) -> set[str]:
    """The adapters of this module's tenants that an engine holds."""
    return {n for n in slot.loaded if n.split("--")[0] in {tenant for tenant, _ in ADAPTERS}}


def test_affinity_failover_and_return_to_rotation(two_engine_gateway, gateway, engine_b):
    url, services, keys = two_engine_gateway
    slot_a, slot_b = services.pool.slots

    # 1. Traffic over 6 adapters from 3 tenants, below capacity: each adapter is loaded once, on one
    #    engine, and stays there. A also holds the session gateway's adapters (the pool takes what each engine
    #    reports it holds), so new adapters go to B first.
    assert traffic(url, keys, rounds=4) == [200] * 24
    names_a, names_b = ours(slot_a), ours(slot_b)
    assert len(names_a) + len(names_b) == 6 and not names_a & names_b, (names_a, names_b)
    assert names_b, "new adapters go to the engine holding fewer"
    assert loads_by_engine(url) == {e: n for e, n in ((gateway.engine_url, len(names_a)),
                                                      (engine_b.url, len(names_b))) if n}

    # 2. Engine B dies: every later request succeeds on A (retried there when it had been sent to B).
    engine_b.kill()
    assert traffic(url, keys, rounds=3) == [200] * 18
    assert not slot_b.up
    assert len(ours(slot_a)) == 6, "B's adapters were loaded on A"

    # 3. B comes back on the same address: the health check returns it to rotation, and it gets traffic
    #    again, here the overflow of one adapter busier than A's capacity.
    engine_b.start()
    engine_b.wait_ready()
    wait_for(lambda: slot_b.up, "engine B back in rotation")
    assert engine_b.requests_served() == 0
    tenant, name = ADAPTERS[0]
    with ThreadPoolExecutor(2 * CAPACITY) as pool:
        statuses = list(pool.map(lambda _: ask(url, keys[tenant], name, max_tokens=24), range(2 * CAPACITY)))
    assert statuses == [200] * (2 * CAPACITY)
    assert engine_b.requests_served() >= 1, "the restarted engine served part of the burst"
    assert any(n.startswith(f"{tenant}--{name}--") for n in slot_b.loaded)


def test_a_restarted_gateway_routes_to_the_engine_that_holds_the_adapter_without_a_load(two_engine_gateway, engine_b):
    """Issue 17: a gateway knew what each engine held only from its own loads, so after a restart (or beside
    another gateway) it loaded an adapter again, often on another engine. It now takes each engine's
    `/v1/models` as the truth at every health check."""
    _, services, keys = two_engine_gateway
    tenant, name = ADAPTERS[0]  # the previous test left it loaded on B (and all six on A)
    held_by_b = next(n for n in services.pool.slots[1].loaded if n.startswith(f"{tenant}--{name}--"))
    settings = services.settings.model_copy(update={"port": free_port()})
    with running_gateway(settings) as app:  # a new gateway process on the same database and engines
        fresh = app.state.services.pool
        wait_for(lambda: held_by_b in fresh.slots[1].loaded, "the new gateway learning what B holds", timeout=120)
        assert ours(fresh.slots[0]) == ours(services.pool.slots[0])  # and what A holds
        url = f"http://127.0.0.1:{settings.port}"
        assert [ask(url, keys[t], n) for t, n in ADAPTERS] == [200] * len(ADAPTERS)
        assert loads_by_engine(url) == {}, "no adapter was loaded again"

