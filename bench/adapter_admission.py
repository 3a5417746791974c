"""Should the gateway hold requests by adapter? Issue 14's item 5, measured before it is built.

    .venv/bin/python bench/adapter_admission.py [--rounds 2] [--max-wait 2]

With more adapters asked for than engine slots (--max-loras 4), a batch holds at most 4 distinct adapters and
vLLM's scheduler fills a free slot in arrival order: the oldest waiting request whose adapter has no slot takes
it. The alternative (LoRAX's adapter cycling) is for the gateway to hold requests so that at most --max-loras
adapters are in flight, and to give a free slot to the adapter with the most requests waiting: more sequences
per batch, so more tokens per decode step. So that no adapter starves, a request that has waited --max-wait
seconds closes the adapters in flight to newcomers (they drain) and its adapter takes the next free slot
(--max-wait 0: strict arrival order, the opposite trade, for the tail).

This measures that policy before it is built: the hold (`AdapterGate`) sits in the load generator, in front of
the gateway, where the gateway's would sit, and a request's TTFT counts from its arrival, the hold included.
One gateway at --max-loras 4 and --max-cpu-loras 16, `many_adapters`'s request sequences (16-token streamed
answers, 16 at once): 16-uniform, 64-uniform, 64-skewed (--requests each), and Zipf over 1,000 adapter names
(--zipf-requests; only the names asked for are published). Each row runs under both policies --rounds times in
alternating order (A B, then B A), each run on fresh adapter names so each pays the same loads. The base model's
row, run first and last, is the baseline of the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

from harness import BenchServer, make_adapters, print_table
from many_adapters import ms, quantile, run_row, sequence

from server.storage.factory import build_registry, build_store

ROWS = [("16-uniform", 16, "uniform"), ("64-uniform", 64, "uniform"), ("64-skewed", 64, "skewed"),
        ("1000-zipf", 1000, "skewed")]
POLICIES = ("arrival order (vLLM)", "most waiting first (held)")


class AdapterGate:
    """At most `slots` adapters in flight; a free slot goes to the adapter with the most requests waiting (ties:
    the one waiting longest), or, once a request has waited `max_wait` seconds, to that request's adapter, while
    the adapters in flight take no newcomers. The base model (None) needs no slot and is never held."""

    def __init__(self, slots: int, max_wait: float):
        self.slots, self.max_wait = slots, max_wait
        self.in_flight: Counter = Counter()
        self.waiting: dict[int, deque[tuple[float, asyncio.Future]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, adapter: int | None):
        if adapter is None:
            yield
            return
        if self.waiting or (adapter not in self.in_flight and len(self.in_flight) >= self.slots):
            entry = (time.monotonic(), asyncio.get_running_loop().create_future())
            self.waiting.setdefault(adapter, deque()).append(entry)
            self._fill()
            try:
                await entry[1]
            except BaseException:
                if entry[1].done():  # let in, then cancelled: counted in flight
                    self._leave(adapter)
                else:
                    self.waiting[adapter].remove(entry)
                    if not self.waiting[adapter]:
                        del self.waiting[adapter]
                raise
        else:
            self.in_flight[adapter] += 1
        try:
            yield
        finally:
            self._leave(adapter)

    def _leave(self, adapter: int) -> None:
        self.in_flight[adapter] -= 1
        if not self.in_flight[adapter]:
            del self.in_flight[adapter]
        self._fill()

    def _starving(self) -> int | None:
        """The adapter of the longest-waiting request, if that request has waited `max_wait`."""
        if not self.waiting:
            return None
        oldest, adapter = min((queue[0][0], a) for a, queue in self.waiting.items())
        return adapter if time.monotonic() - oldest >= self.max_wait else None

    def _next(self) -> int | None:
        """The waiting adapter to let in now, if any."""
        starving = self._starving()
        if starving is not None:  # the adapters in flight take no newcomers: they drain
            return starving if starving in self.in_flight or len(self.in_flight) < self.slots else None
        joining = next((a for a in self.waiting if a in self.in_flight), None)
        if joining is not None or len(self.in_flight) >= self.slots:
            return joining
        return max(self.waiting, key=lambda a: (len(self.waiting[a]), -self.waiting[a][0][0]))

    def _fill(self) -> None:
        while self.waiting and (chosen := self._next()) is not None:
            for _, future in self.waiting.pop(chosen):
                self.in_flight[chosen] += 1
                future.set_result(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each row under each policy")
    parser.add_argument("--requests", type=int, default=48, help="requests of the 16- and 64-adapter rows")
    parser.add_argument("--zipf-requests", type=int, default=200, help="requests of the 1,000-name row")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--max-wait", type=float, default=2.0, help="seconds a held request waits at most for "
                        "its adapter to be next")
    parser.add_argument("--rows", nargs="+", choices=[label for label, _, _ in ROWS], default=[r[0] for r in ROWS])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = [row for row in ROWS if row[0] in args.rows]
    results: dict[str, dict[str, list[dict]]] = {label: {p: [] for p in POLICIES} for label, _, _ in rows}
    names = (f"x{i}" for i in itertools.count())
    with tempfile.TemporaryDirectory() as tmp, BenchServer(
            LORASERVE_ENGINE_MAX_LORAS=str(args.max_loras), LORASERVE_ENGINE_MAX_CPU_LORAS=str(args.max_cpu_loras),
            LORASERVE_TENANT_MAX_ADAPTERS="100000") as server:
        folders = make_adapters(server.model, Path(tmp), 16)
        unbounded = server.settings.model_copy(update={"tenant_max_adapters": None})  # fresh names for every run
        registry = build_registry(unbounded, build_store(server.settings))
        base_seq = sequence(0, "-", args.requests, args.seed)
        base_model = [server.settings.served_model_name]
        asyncio.run(run_row(server, base_model, sequence(0, "-", args.concurrency, args.seed + 99), args))  # warm-up
        bases = [asyncio.run(run_row(server, base_model, base_seq, args))["tokens_per_s"]]
        for round_ in range(args.rounds):
            for label, n, distribution in rows:
                seq = sequence(n, distribution, args.zipf_requests if n > 64 else args.requests, args.seed)
                for policy in POLICIES if round_ % 2 == 0 else POLICIES[::-1]:
                    models = {a: next(names) for a in {a for a, _ in seq}}  # fresh names: loaded nowhere yet
                    for a, name in models.items():
                        registry.publish(folders[a % len(folders)], "bench", name, origin="bench")
                    gate = AdapterGate(args.max_loras, args.max_wait) if policy == POLICIES[1] else None
                    row = asyncio.run(run_row(server, models, seq, args, gate))
                    results[label][policy].append(row)
                    print(f"{label}, {policy}: {row['tokens_per_s']:.1f} tok/s, p99 TTFT "
                          f"{ms(row['ttft_s'], 0.99)} ms, {len(row['errors'])} errors", flush=True)
        bases.append(asyncio.run(run_row(server, base_model, base_seq, args))["tokens_per_s"])
    base = statistics.mean(bases)
    table = []
    for label, _, _ in rows:
        for policy in POLICIES:
            runs = results[label][policy]
            ttft = [t for r in runs for t in r["ttft_s"]]
            table.append([label, policy, " / ".join(f"{r['tokens_per_s'] / base:.2f}" for r in runs),
                          ms(ttft, 0.5), ms(ttft, 0.99), f"{quantile(ttft, 0.99) / quantile(ttft, 0.5):.1f}",
                          str(sum(len(r["errors"]) for r in runs))])
    print_table(f"Adapter admission at --max-loras {args.max_loras}: ratio to the base model's tokens/s "
                f"({base:.1f}, mean of {len(bases)} runs: " + ", ".join(f"{b:.1f}" for b in bases) + "), one per "
                f"run; TTFT over all runs of the row, from arrival (the hold included); --max-wait {args.max_wait} s",
                ["row", "policy", "ratio to base, each run", "TTFT p50 ms", "TTFT p99 ms", "p99 / p50", "errors"],
                table, {"base_tokens_per_s": bases, "results": results})


if __name__ == "__main__":
    main()
