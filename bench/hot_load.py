"""How fast a new adapter serves, and how fast service returns after the engine dies.

    .venv/bin/python bench/hot_load.py [--adapters 10]

1. Upload-to-first-answer: a rank-8 PEFT adapter (q/k/v/o projections of SmolLM2-135M) is uploaded
   through the admin API, then asked for one token; the clock runs from sending the upload to the
   answer. Baseline in the same run: the same one-token request on an adapter already loaded.
2. Engine kill to first successful request, against the engine's first start in the same run.
3. A new adapter into service by hot load (1.) against restarting an engine with the adapter given at
   start (`--lora-modules`), launch to first token.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from harness import ENGINE_MEMORY_SHARE, REPO, BenchServer, free_port, make_adapters, print_table

ASK = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}


def upload(client: httpx.Client, server: BenchServer, name: str, folder: Path) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.suffix != ".md"]
    client.post(f"{server.url}/admin/tenants/bench/adapters", data={"name": name}, files=files,
                headers=server.admin_auth).raise_for_status()


def ask_ms(client: httpx.Client, server: BenchServer, model: str, started: float | None = None) -> float:
    started = started or time.perf_counter()
    client.post(f"{server.url}/v1/chat/completions", json={**ASK, "model": model},
                headers=server.auth).raise_for_status()
    return (time.perf_counter() - started) * 1000


def engine_process(server: BenchServer) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "--port" in child.cmdline() and str(server.engine_port) in child.cmdline():
            return child
    raise RuntimeError("engine process not found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10)
    n = parser.parse_args().adapters
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=300) as client:
        with BenchServer() as server:
            warm, cold, recovery, folders = measure_gateway(server, client, Path(tmp), n)
        restart = restart_with_adapter(server.model, folders[0], Path(tmp))
    report(n, warm, cold, recovery, restart, server.start_seconds)


def measure_gateway(server: BenchServer, client: httpx.Client, tmp: Path, n: int):
    """Loaded vs freshly uploaded adapters, then the engine killed under the gateway."""
    folders = make_adapters(server.model, tmp, n + 1)
    upload(client, server, "warm", folders[-1])
    for _ in range(3):
        ask_ms(client, server, "warm")
    warm = [ask_ms(client, server, "warm") for _ in range(n)]
    cold = []
    for i, folder in enumerate(folders[:n]):
        started = time.perf_counter()
        upload(client, server, f"new-{i}", folder)
        cold.append(ask_ms(client, server, f"new-{i}", started))

    killed = time.perf_counter()
    engine_process(server).kill()
    while True:
        try:
            ask_ms(client, server, "warm")
            break
        except httpx.HTTPError:
            time.sleep(0.25)
    recovery = time.perf_counter() - killed
    return warm, cold, recovery, folders


def restart_with_adapter(model: Path, adapter: Path, tmp: Path) -> float:
    """Seconds from launching an engine with the adapter given at start (`--lora-modules`) to its first
    one-token answer on that adapter: what serving a new adapter costs without hot loading."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    env.update(LORASERVE_DATA_DIR=str(tmp / "restart"), LORASERVE_BASE_MODEL_PATH=str(model),
               LORASERVE_ENGINE_PORT=str(port), LORASERVE_ENGINE_MEMORY_UTILIZATION=ENGINE_MEMORY_SHARE,
               LORASERVE_ENGINE_EXTRA_ARGS=f"--lora-modules restarted={adapter}")
    started = time.perf_counter()
    engine = subprocess.Popen([sys.executable, "-m", "server.cli", "engine"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**ASK, "model": "restarted"},
                           timeout=60).raise_for_status()
                return time.perf_counter() - started
            except httpx.HTTPError:
                if engine.poll() is not None or time.perf_counter() - started > 900:
                    sys.exit("the engine with --lora-modules did not start")
                time.sleep(0.25)
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(60)


def report(n: int, warm: list[float], cold: list[float], recovery: float, restart: float, first_start: float):
    base = statistics.median(warm)
    print_table(f"Rank-8 adapter, {n} samples each, one output token (ms)",
                ["measurement", "median ms", "max ms", "ratio to loaded adapter"],
                [["request on an adapter already loaded", f"{base:.0f}", f"{max(warm):.0f}", "1.00"],
                 ["upload, then first answer", f"{statistics.median(cold):.0f}", f"{max(cold):.0f}",
                  f"{statistics.median(cold) / base:.2f}"]])
    print_table("Engine death (SIGKILL) to service again (s)", ["measurement", "seconds", "ratio to first start"],
                [["engine first start (gateway launch to ready)", f"{first_start:.1f}", "1.00"],
                 ["kill to first successful adapter request", f"{recovery:.1f}",
                  f"{recovery / first_start:.2f}"]])
    hot = statistics.median(cold) / 1000
    print_table("A new adapter into service: hot load against an engine restart (s)",
                ["way", "seconds to first token", "ratio to hot load"],
                [["upload through the admin API (hot load), then first token", f"{hot:.2f}", "1.00"],
                 ["restart the engine with the adapter given at start (--lora-modules), then first token",
                  f"{restart:.1f}", f"{restart / hot:.0f}"]],
                data={"hot_load_s": hot, "restart_s": restart})


if __name__ == "__main__":
    main()
