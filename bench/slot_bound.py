"""What a perfect scheduler could reach in `many_adapters`'s rows: a bound on adapter ÷ base tokens/s from the
engine's own step times.

    .venv/bin/python bench/slot_bound.py [--max-loras 4] [--tokens 48]

A batch holds at most --max-loras distinct adapters, and a request's adapter must hold a slot for each of its
decode steps, so a row whose requests name D distinct adapters needs at least D x K / slots decode steps (K tokens
per answer), and never fewer than the base model's ceil(R / C) x K (R requests, C at once). First this measures the
engine's decode step time by batch size (the base model, b requests of --tokens tokens sent at once to the engine
direct, twice) and fits step = a + b x per-sequence over b >= 4 (below that, per-request costs dominate). Then, for
each `many_adapters` row (its seeded sequence): the fewest steps, and two estimates of the ratio to base if every
step cost a + b x per-sequence and no adapter load cost anything. "Decode only" counts nothing else, so it is too
low: a row also spends time on prefill, HTTP and the tail of its last requests, which the adapters pay as much as
the base model. "With the rest" measures `many_adapters`'s base row itself (the same requests through the gateway,
twice) and adds what its wall time holds beyond its decode steps to both sides. Estimates of the ceiling, not
measurements of the server: a run can come out above them by noise, or because prefill overlaps decode steps.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time

import httpx
from harness import BenchServer, print_table
from many_adapters import ROWS, run_row, sequence

BATCHES = (1, 2, 4, 6, 8, 12, 16)


async def decode_seconds(url: str, model: str, batch: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            reply = await client.post(f"{url}/v1/completions", json={
                "model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": tokens,
                "min_tokens": tokens, "ignore_eos": True, "temperature": 0})
            reply.raise_for_status()

        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(batch)))
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-loras", type=int, default=4, help="engine slots of the rows to bound")
    parser.add_argument("--tokens", type=int, default=48, help="decode steps per measurement")
    parser.add_argument("--requests", type=int, default=24, help="many_adapters's --requests")
    parser.add_argument("--concurrency", type=int, default=16, help="many_adapters's --concurrency")
    parser.add_argument("--max-tokens", type=int, default=16, help="many_adapters's --max-tokens")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    steps: dict[int, list[float]] = {b: [] for b in BATCHES}
    with BenchServer() as server:
        model = httpx.get(f"{server.engine_url}/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(decode_seconds(server.engine_url, model, 4, args.tokens))  # warm-up
        for _ in range(2):
            for b in BATCHES:
                steps[b].append(asyncio.run(decode_seconds(server.engine_url, model, b, args.tokens)) / args.tokens)
        base_seq = sequence(0, "-", args.requests, args.seed)
        base_walls = [asyncio.run(run_row(server, [], base_seq, args))["wall_s"] for _ in range(2)]
    step = {b: min(times) for b, times in steps.items()}
    fitted = [b for b in BATCHES if b >= 4]
    per_seq, fixed = statistics.linear_regression(fitted, [step[b] for b in fitted])
    print_table(f"Engine decode step time by batch size (base model, {args.tokens} tokens, best of 2; fit over b >= 4: "
                f"{fixed * 1000:.1f} ms + {per_seq * 1000:.2f} ms per sequence)",
                ["sequences in the batch", "ms per step", "fit ms", "tokens/s"],
                [[str(b), f"{t * 1000:.1f}", f"{(fixed + per_seq * b) * 1000:.1f}", f"{b / t:.0f}"]
                 for b, t in step.items()], {"step_s": step, "fixed_s": fixed, "per_sequence_s": per_seq})

    r, k, c = args.requests, args.max_tokens, args.concurrency
    base_steps = math.ceil(r / c) * k
    base_decode = base_steps * fixed + r * k * per_seq
    base_wall = statistics.mean(base_walls)
    rest = max(base_wall - base_decode, 0.0)
    print(f"many_adapters's base row through the gateway: {base_wall:.2f} s (runs {base_walls[0]:.2f}, "
          f"{base_walls[1]:.2f}), of which decode steps by the fit {base_decode:.2f} s, the rest {rest:.2f} s")
    rows, bounds = [], {}
    for label, n, distribution in ROWS[1:]:
        distinct = len({a for a, _ in sequence(n, distribution, r, args.seed)})
        fewest = max(math.ceil(distinct * k / args.max_loras), base_steps)
        decode = fewest * fixed + r * k * per_seq
        bounds[label] = {"decode_only": base_decode / decode, "with_rest": base_wall / (rest + decode)}
        rows.append([label, str(distinct), str(fewest), str(base_steps), f"{bounds[label]['decode_only']:.2f}",
                     f"{bounds[label]['with_rest']:.2f}"])
    print_table(f"Ceiling of adapter ÷ base tokens/s in many_adapters's rows at --max-loras {args.max_loras} "
                f"({r} requests of {k} tokens, {c} at once; perfect scheduling, free loads; with the rest: the base "
                f"row's {rest:.2f} s beyond its decode steps added to both sides)",
                ["row", "distinct adapters", "fewest decode steps", "base model's steps", "decode only",
                 "with the rest"], rows,
                {"base_wall_s": base_walls, "base_decode_s": base_decode, "rest_s": rest, "bounds": bounds})


if __name__ == "__main__":
    main()
