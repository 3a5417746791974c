"""The supervisor brings a killed engine back, and adapters are loaded again on demand."""

from __future__ import annotations

import os
import signal
import time

import httpx

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_killed_engine_is_restarted_and_serves_adapters_again(gateway):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    before = alpha.chat.completions.create(model="support", messages=PROMPT, max_tokens=16, temperature=0)
    supervisor = gateway.services.supervisor
    old_pid, restarts = supervisor.pid, supervisor.restarts

    os.killpg(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while gateway.ready():
        assert time.monotonic() < deadline, "readiness never dropped after the engine was killed"
        time.sleep(0.2)
    gateway.wait_ready()

    assert supervisor.restarts == restarts + 1 and supervisor.pid != old_pid
    after = alpha.chat.completions.create(model="support", messages=PROMPT, max_tokens=16, temperature=0)
    assert after.choices[0].message.content == before.choices[0].message.content
    loaded = {m["id"] for m in httpx.get(f"{gateway.engine_url}/v1/models").json()["data"]}
    assert "alpha--support--v1" in loaded  # loaded again on the new engine, under the internal name
