"""SIGTERM: the gateway stops taking requests, lets running ones finish, and exits with no child left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil

from server.config import Settings
from server.storage.factory import build_store
from tests.conftest import REPO, free_port, wait_until_ok


def test_sigterm_drains_running_streams_and_leaves_no_child(gateway, tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, base_model_path=gateway.settings.model_path)
    store = build_store(settings)
    store.create_tenant("omega")
    _, key = store.create_key("omega")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    env.update(LORASERVE_DATA_DIR=str(tmp_path), LORASERVE_PORT=str(port), LORASERVE_RUN_WORKER="true",
               LORASERVE_ENGINE_URLS=gateway.engine_url, LORASERVE_BASE_MODEL_PATH=str(settings.model_path))
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "gateway"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "gateway.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    wait_until_ok(f"{url}/readyz", server, tmp_path / "gateway.log")
    children = psutil.Process(server.pid).children(recursive=True)
    assert children, "the worker child should be running"

    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "default", "messages": [{"role": "user", "content": "Tell a story."}],
                                "max_tokens": 60, "min_tokens": 60, "stream": True}) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    server.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:
        refused = httpx.get(f"{url}/healthz", timeout=5).status_code >= 500
    except httpx.HTTPError:
        refused = True
    assert refused, "a draining gateway took a new request"
    reader.join(90)
    assert lines[-1] == "data: [DONE]" and sum(1 for x in lines if x.startswith("data: {")) >= 60
    # uvicorn re-raises the signal once its graceful shutdown is done, so "killed by SIGTERM" is the clean end.
    assert server.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
