"""Gateways as separate OS processes (`loraserve gateway`), for tests of several gateways on shared stores."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ADMIN_KEY, REPO, free_port


@contextlib.contextmanager
def killing(*processes: subprocess.Popen):
    """Kill the processes' groups on the way out, whatever happened."""
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=30)


def start_gateway(tmp: Path, name: str, engine_url: str, database_url: str, registry: Path, model: Path,
                  **settings: str):
    """A gateway on `engine_url` and `database_url`, with more LORASERVE_* `settings` (lower-case names); its
    process, URL and log."""
    data = tmp / name
    data.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    env.update(LORASERVE_ENGINE_URLS=engine_url, LORASERVE_DATABASE_URL=database_url, LORASERVE_PORT=str(port),
               LORASERVE_REGISTRY_DIR=str(registry), LORASERVE_DATA_DIR=str(data), LORASERVE_ADMIN_KEY=ADMIN_KEY,
               LORASERVE_BASE_MODEL_PATH=str(model), LORASERVE_LOG_FORMAT="text")
    env.update({f"LORASERVE_{key.upper()}": value for key, value in settings.items()})
    log = data / "gateway.log"
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "gateway"], cwd=REPO, env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}", log
