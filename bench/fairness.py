"""One tenant floods the server: what happens to another tenant's latency.

    .venv/bin/python bench/fairness.py [--requests 10] [--flood 48]

The victim sends short requests one after another, first alone, then while a flooding tenant keeps
`--flood` requests open at once (retrying whatever is refused). Each tenant may hold at most
LORASERVE_TENANT_MAX_CONCURRENT_REQUESTS (16) requests in the engine, so the flood cannot fill the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from harness import BenchServer, print_table

from server.services import build_store

VICTIM = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
FLOOD = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 64}


async def victim(client: httpx.AsyncClient, server: BenchServer, key: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        r = await client.post(f"{server.url}/v1/chat/completions", json=VICTIM,
                              headers={"Authorization": f"Bearer {key}"})
        r.raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def flooder(client: httpx.AsyncClient, server: BenchServer, key: str, stop: asyncio.Event, counts: dict):
    while not stop.is_set():
        r = await client.post(f"{server.url}/v1/chat/completions", json=FLOOD,
                              headers={"Authorization": f"Bearer {key}"})
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        if r.status_code == 429:
            await asyncio.sleep(0.05)


async def measure(server: BenchServer, victim_key: str, flood_key: str, n: int, flood: int):
    async with httpx.AsyncClient(timeout=600) as client:
        await victim(client, server, victim_key, 2)  # warm up
        alone = await victim(client, server, victim_key, n)
        stop, counts = asyncio.Event(), {}
        tasks = [asyncio.create_task(flooder(client, server, flood_key, stop, counts)) for _ in range(flood)]
        await asyncio.sleep(3)  # let the flood fill the engine
        during = await victim(client, server, victim_key, n)
        stop.set()
        await asyncio.gather(*tasks)
    return alone, during, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--flood", type=int, default=48)
    args = parser.parse_args()
    with BenchServer() as server:
        store = build_store(server.settings)
        keys = {}
        for tenant in ("victim", "flood"):
            store.create_tenant(tenant)
            keys[tenant] = store.create_key(tenant)[1]
        alone, during, counts = asyncio.run(measure(server, keys["victim"], keys["flood"], args.requests, args.flood))
    p50, p99 = (lambda xs: statistics.median(xs)), (lambda xs: max(xs) if len(xs) < 100 else
                                                     statistics.quantiles(xs, n=100)[-1])
    rows = [[name, f"{p50(xs):.0f}", f"{p99(xs):.0f}", f"{p50(xs) / p50(alone):.2f}"]
            for name, xs in (("victim alone", alone), (f"victim while a tenant floods with {args.flood} open", during))]
    print_table(f"Another tenant's latency under a flood, {args.requests} requests of 8 tokens (ms; p99 = max "
                "when fewer than 100)", ["case", "p50 ms", "p99 ms", "p50 ratio to alone"], rows)
    print(f"\nflooding tenant's answers by status: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
