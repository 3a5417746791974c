"""One tenant attacks the server: what happens to another tenant's latency and accounting.

    .venv/bin/python bench/fairness.py [--requests 100] [--flood 48] [--tenant-cap N] [--backoff S]

The victim sends short requests one after another, first alone, then while a hostile tenant keeps
`--flood` requests open at once (retrying whatever is refused), mixing three attacks: long answers, prompt
lists with `n` (many sequences in one request) and streams it hangs up on after a few chunks. Each tenant
may hold at most LORASERVE_TENANT_MAX_CONCURRENT_REQUESTS (16) sequences in the engine, so the flood cannot
fill the batch. The target is the victim's p99 within 2x of alone, with the same token counts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
from harness import BenchServer, print_table

from server.services import build_store

VICTIM = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
          "temperature": 0}
FLOOD = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 64}
WIDE = {"model": "default", "prompt": ["Once upon a time"] * 8, "n": 2, "max_tokens": 32}
STREAM = {**FLOOD, "stream": True, "max_tokens": 256}


async def victim(client: httpx.AsyncClient, server: BenchServer, key: str, n: int) -> tuple[list[float], list[int]]:
    times, tokens = [], []
    for _ in range(n):
        started = time.perf_counter()
        r = await client.post(f"{server.url}/v1/chat/completions", json=VICTIM,
                              headers={"Authorization": f"Bearer {key}"})
        r.raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
        tokens.append(r.json()["usage"]["total_tokens"])
    return times, tokens


async def flooder(client: httpx.AsyncClient, server: BenchServer, key: str, stop: asyncio.Event, counts: dict,
                  attack: int, backoff: float):
    headers = {"Authorization": f"Bearer {key}"}
    while not stop.is_set():
        if attack == 0:
            r = await client.post(f"{server.url}/v1/chat/completions", json=FLOOD, headers=headers)
        elif attack == 1:
            r = await client.post(f"{server.url}/v1/completions", json=WIDE, headers=headers)
        else:
            async with client.stream("POST", f"{server.url}/v1/chat/completions", json=STREAM,
                                     headers=headers) as r:
                if r.status_code == 200:
                    lines = r.aiter_lines()
                    for _ in range(3):
                        await anext(lines, None)  # then hang up
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        if r.status_code != 200:
            await asyncio.sleep(backoff)


async def measure(server: BenchServer, victim_key: str, flood_key: str, n: int, flood: int, backoff: float):
    async with httpx.AsyncClient(timeout=600) as client:
        await victim(client, server, victim_key, 2)  # warm up
        alone = await victim(client, server, victim_key, n)
        stop, counts = asyncio.Event(), {}
        tasks = [asyncio.create_task(flooder(client, server, flood_key, stop, counts, i % 3, backoff))
                 for i in range(flood)]
        await asyncio.sleep(3)  # let the flood fill the engine
        during = await victim(client, server, victim_key, n)
        stop.set()
        await asyncio.gather(*tasks)
    return alone, during, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--flood", type=int, default=48)
    parser.add_argument("--backoff", type=float, default=0.05, help="seconds the attacker waits after a refusal")
    parser.add_argument("--tenant-cap", type=int, default=None,
                        help="LORASERVE_TENANT_MAX_CONCURRENT_REQUESTS for this run (default: the setting's)")
    args = parser.parse_args()
    env = {} if args.tenant_cap is None else {"LORASERVE_TENANT_MAX_CONCURRENT_REQUESTS": str(args.tenant_cap)}
    with BenchServer(**env) as server:
        store = build_store(server.settings)
        keys = {}
        for tenant in ("victim", "flood"):
            store.create_tenant(tenant)
            keys[tenant] = store.create_key(tenant)[1]
        alone, during, counts = asyncio.run(measure(server, keys["victim"], keys["flood"], args.requests, args.flood,
                                                      args.backoff))
    (alone, alone_tokens), (during, during_tokens) = alone, during
    p50 = statistics.median

    def p99(xs):
        return max(xs) if len(xs) < 100 else statistics.quantiles(xs, n=100)[-1]

    rows = [[name, f"{p50(xs):.0f}", f"{p99(xs):.0f}", f"{max(xs):.0f}", f"{p50(xs) / p50(alone):.2f}",
             f"{p99(xs) / p99(alone):.2f}", str(sum(tokens))]
            for name, xs, tokens in (("victim alone", alone, alone_tokens),
                                     (f"victim while a tenant attacks with {args.flood} open", during, during_tokens))]
    print_table(f"Another tenant's latency under attack, {args.requests} requests of 8 tokens (ms; p99 = max "
                "when fewer than 100; target: p99 ratio at most 2)",
                ["case", "p50 ms", "p99 ms", "max ms", "p50 ratio to alone", "p99 ratio to alone", "victim tokens"],
                rows)
    print(f"\nattacking tenant's answers by status: {dict(sorted(counts.items()))}")

if __name__ == "__main__":
    main()
