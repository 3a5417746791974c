"""Engine faults on the real engine: a client hanging up, the engine stalling, the engine dying
mid-stream; the supervisor brings it back and adapters are loaded again on demand."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx

from tests.conftest import ENGINE_READ_TIMEOUT, exactly

PROMPT = [{"role": "user", "content": "Write a long story about the sea."}]


def engine_running(gateway) -> float:
    text = httpx.get(f"{gateway.engine_url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M))


def open_stream(gateway, client: httpx.Client, max_tokens: int = 400):
    return client.stream("POST", f"{gateway.url}/v1/chat/completions", json={
        "model": "support", "messages": PROMPT, "stream": True, "temperature": 0, **exactly(max_tokens)},
        headers={"Authorization": f"Bearer {gateway.tenants['alpha'].key}"})


def test_a_client_hanging_up_aborts_its_engine_request(gateway):
    gateway.wait_quiet()
    with httpx.Client(timeout=60) as client, open_stream(gateway, client) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        # The engine's gauge is written after it sent the first tokens: wait for it (liveness, not speed).
        deadline, seen = time.monotonic() + 60, set()
        while (running := engine_running(gateway)) != 1:
            seen.add(running)
            assert time.monotonic() < deadline, f"the engine never showed the stream running alone: {sorted(seen)}"
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while engine_running(gateway) != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.2)


def test_a_stalled_engine_is_caught_by_the_timeout(gateway):
    pid = gateway.services.supervisor.pid
    os.killpg(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json={
            "model": "default", "messages": PROMPT, "max_tokens": 4},
            headers={"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}, timeout=120)
        waited = time.monotonic() - started
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert waited < ENGINE_READ_TIMEOUT + 15
        assert not gateway.ready()
    finally:
        os.killpg(pid, signal.SIGCONT)
    gateway.wait_ready(60)


def test_engine_death_mid_stream_then_restart(gateway):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    before = alpha.chat.completions.create(model="support", messages=PROMPT, max_tokens=16, temperature=0)
    supervisor = gateway.services.supervisor
    old_pid, restarts = supervisor.pid, supervisor.restarts

    events = []
    with httpx.Client(timeout=60) as client, open_stream(gateway, client) as response:
        lines = response.iter_lines()
        events.append(next(lines))
        os.killpg(old_pid, signal.SIGKILL)
        events += [line for line in lines if line.startswith("data:")]
    last = json.loads(events[-1].removeprefix("data:").strip())
    assert last["error"]["code"] == "engine_unavailable"  # the open stream ends with an error event

    down = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "support", "messages": PROMPT},
                      headers={"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}, timeout=30)
    assert down.status_code == 503 and "Retry-After" in down.headers
    # /readyz may reuse an engine health check up to 0.25 s old, from before the kill: it must turn not ready
    # soon after (the restarted engine needs far longer than that to start)
    deadline = time.monotonic() + 30
    while gateway.ready():
        assert time.monotonic() < deadline, "the gateway stayed ready with its only engine dead"
        time.sleep(0.1)
    gateway.wait_ready()

    assert supervisor.restarts == restarts + 1 and supervisor.pid != old_pid
    after = alpha.chat.completions.create(model="support", messages=PROMPT, max_tokens=16, temperature=0)
    assert after.choices[0].message.content == before.choices[0].message.content
    assert "alpha--support--v1" in gateway.engine_models()  # loaded again, under the internal name


def test_bounded_load_from_ten_tenants(gateway):
    keys = []
    for i in range(10):
        tenant = f"load-{i}"
        assert gateway.admin("POST", "/tenants", json={"id": tenant}).status_code == 201
        keys.append(gateway.admin("POST", f"/tenants/{tenant}/keys").json()["key"])
    statuses, lock, limit = [], threading.Lock(), threading.Semaphore(32)

    def one(i: int) -> None:
        with limit:
            body = {"model": "default", "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 4}
            r = httpx.post(f"{gateway.url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {keys[i % 10]}"}, timeout=300)
            ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
            with lock:
                statuses.append(r.status_code if ok else -r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(statuses) == 200 and set(statuses) == {200}, sorted(set(statuses))
