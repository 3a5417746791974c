"""How fast a new adapter serves, and how fast service returns after the engine dies.

    .venv/bin/python bench/hot_load.py [--adapters 10]

1. Upload-to-first-answer: a rank-8 PEFT adapter (q/k/v/o projections of SmolLM2-135M) is uploaded
   through the admin API, then asked for one token; the clock runs from sending the upload to the
   answer. Baseline in the same run: the same one-token request on an adapter already loaded.
2. Engine kill to first successful request, against the engine's first start in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from harness import BenchServer, make_adapters, print_table

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
    with tempfile.TemporaryDirectory() as tmp, BenchServer() as server, httpx.Client(timeout=300) as client:
        folders = make_adapters(server.model, Path(tmp), n + 1)
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

    base = statistics.median(warm)
    print_table(f"Rank-8 adapter, {n} samples each, one output token (ms)",
                ["measurement", "median ms", "max ms", "ratio to loaded adapter"],
                [["request on an adapter already loaded", f"{base:.0f}", f"{max(warm):.0f}", "1.00"],
                 ["upload, then first answer", f"{statistics.median(cold):.0f}", f"{max(cold):.0f}",
                  f"{statistics.median(cold) / base:.2f}"]])
    print_table("Engine death (SIGKILL) to service again (s)", ["measurement", "seconds", "ratio to first start"],
                [["engine first start (gateway launch to ready)", f"{server.start_seconds:.1f}", "1.00"],
                 ["kill to first successful adapter request", f"{recovery:.1f}",
                  f"{recovery / server.start_seconds:.2f}"]])


if __name__ == "__main__":
    main()
