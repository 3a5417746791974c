"""What counting tenant limits in Redis costs a request: admission and release through the shared store against
the same limiter counting in the gateway's process.

    .venv/bin/python bench/shared_limits.py [--requests 4000]

Starts Debian's `redis-server` on a loopback port (no persistence) and drives the gateway's real `Limiter`,
with and without `SharedCounts` (server/serving/shared_counts.py), with a tenant that has all three limits set
(concurrency, requests and tokens per minute: each admission checks and charges them, each release gives back
the sequences and the unused tokens). Rows: one request at a time (the latency an admission adds), and 32 at
once (what one gateway process can admit per second). Two gateways' worth of counts would not change these:
the store does the same work whoever asks.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time

import redis
from harness import free_port, print_table

from server.serving.limits import Limiter
from server.serving.shared_counts import SharedCounts

LIMITS = {"max_concurrent_requests": 1_000_000, "requests_per_minute": 1_000_000_000,
          "tokens_per_minute": 1_000_000_000_000}


async def run(limiter: Limiter, shared: SharedCounts | None, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []

    async def worker(count: int) -> None:
        for i in range(count):
            started = time.perf_counter()
            ticket = await limiter.acquire(f"tenant-{i % 8}", LIMITS, tokens=300)
            latencies.append(time.perf_counter() - started)
            ticket.release(120)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    if shared is not None:
        await shared.flush()  # the releases sent in the background count too
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    latencies.sort()
    return {"per_s": len(latencies) / wall, "p50_us": statistics.median(latencies) * 1e6,
            "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6, "cpu_us": cpu / len(latencies) * 1e6}


async def measure(url: str, requests: int) -> dict:
    results = {}
    for concurrency in (1, 32):
        local = await run(Limiter(1_000_000), None, requests, concurrency)
        shared = SharedCounts(url)
        await shared.beat()
        results[concurrency] = {"local": local,
                                "shared": await run(Limiter(1_000_000, shared=shared), shared, requests, concurrency)}
        await shared.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: install Debian's redis-server (make system-packages does)")
    port, folder = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                               "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.1)
        results = asyncio.run(measure(url, args.requests))
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    rows, data = [], {}
    for concurrency, pair in results.items():
        local, shared = pair["local"], pair["shared"]
        for name, row in (("in the gateway", local), ("Redis", shared)):
            rows.append([f"{concurrency} at once, {name}", f"{row['per_s']:,.0f}", f"{row['p50_us']:.0f}",
                         f"{row['p99_us']:.0f}", f"{row['cpu_us']:.0f}", f"{row['per_s'] / local['per_s']:.2f}"])
        data[str(concurrency)] = pair
    print_table(f"Admission and release of {args.requests} requests (3 limits each), one gateway process",
                ["counted", "admissions/s", "p50 us", "p99 us", "gateway CPU us per request",
                 "ratio to in the gateway"], rows, data)


if __name__ == "__main__":
    main()
