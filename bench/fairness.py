"""One tenant attacks the server: what happens to another tenant's latency and accounting.

    .venv/bin/python bench/fairness.py [--requests 100] [--flood 48] [--tenant-cap N] [--backoff S]

The victim sends short requests one after another, first alone, then while a hostile tenant keeps
`--flood` requests open at once (retrying whatever is refused), mixing three attacks: long answers, prompt
lists with `n` (many sequences in one request) and streams it hangs up on after a few chunks. The attacker
runs in a process of its own, as a client on another machine would. The gateway's defences under test: the
contended share, held refusals and preemption (README, "Limits"). The target is the victim's p99 within 2x
of alone, with the same token counts.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time

import httpx
from harness import BenchServer, print_table

from server.storage.factory import build_store

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


async def flooder(client: httpx.AsyncClient, url: str, key: str, stop: asyncio.Event, counts: dict,
                  attack: int, backoff: float):
    headers = {"Authorization": f"Bearer {key}"}
    while not stop.is_set():
        if attack == 0:
            r = await client.post(f"{url}/v1/chat/completions", json=FLOOD, headers=headers)
        elif attack == 1:
            r = await client.post(f"{url}/v1/completions", json=WIDE, headers=headers)
        else:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=STREAM,
                                     headers=headers) as r:
                if r.status_code == 200:
                    lines = r.aiter_lines()
                    for _ in range(3):
                        await anext(lines, None)  # then hang up
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        if r.status_code != 200:
            await asyncio.sleep(backoff)


def attack(url: str, key: str, flood: int, backoff: float, stop, counts_out) -> None:
    """The attacking tenant, in a process of its own: a client on another machine does not share the
    victim's event loop, and here it cannot delay the victim's own reading of its answers."""

    async def run():
        counts, done = {}, asyncio.Event()
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=flood)) as client:
            tasks = [asyncio.create_task(flooder(client, url, key, done, counts, i % 3, backoff))
                     for i in range(flood)]
            await asyncio.to_thread(stop.wait)
            done.set()
            await asyncio.gather(*tasks)
        counts_out.put(counts)

    asyncio.run(run())


async def measure(server: BenchServer, victim_key: str, flood_key: str, n: int, flood: int, backoff: float):
    async with httpx.AsyncClient(timeout=600) as client:
        await victim(client, server, victim_key, 2)  # warm up
        alone = await victim(client, server, victim_key, n)
        context = multiprocessing.get_context("spawn")
        stop, counts_out = context.Event(), context.Queue()
        attacker = context.Process(target=attack, args=(server.url, flood_key, flood, backoff, stop, counts_out))
        attacker.start()
        await asyncio.sleep(3)  # let the flood fill the engine
        during = await victim(client, server, victim_key, n)
        stop.set()
        counts = await asyncio.to_thread(counts_out.get)
        await asyncio.to_thread(attacker.join)
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
