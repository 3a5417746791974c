"""Should the engine pick which adapters take its free slots? Issue 14's scheduling question, measured inside vLLM.

    .venv/bin/python bench/engine_scheduling.py [--rounds 1] [--rows 16-uniform 64-uniform 64-skewed 1000-zipf]

`adapter_admission.py` measured the LoRAX-style policy (a free slot to the adapter with the most requests
waiting; a request that waited --max-wait seconds drains the adapters in flight and goes next) as a hold in
front of the gateway. This measures the same rule inside the engine, where it sees what the engine has queued:
`AdapterAwareScheduler` below is vLLM's own scheduler (`vllm/v1/core/sched/scheduler.py`, 0.32) with its
waiting queue reordered before each step, loaded with `--scheduler-cls` (this folder is put on the engine's
PYTHONPATH). vLLM's order: arrival, skipping a request whose adapter would need a slot while all are held.

Per round, two gateways one after the other (vLLM's order, then this one; reversed in odd rounds), each at
--max-loras 4 and --max-cpu-loras 16, running `adapter_admission`'s rows (`many_adapters`'s sequences, 16-token
streamed answers, 16 at once; the 1,000-name row publishes only the names asked for) on fresh adapter names.
Each gateway's own base-model row, run first and last, is the baseline of its ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler

MAX_WAIT_S = 2.0  # adapter_admission's --max-wait default
POLICIES = ("arrival order (vLLM)", "most waiting first (engine)")


def adapter_of(request) -> int:
    """The request's adapter id; 0 for the base model."""
    return request.lora_request.lora_int_id if request.lora_request else 0


def adapter_order(waiting: list, running: list, max_loras: int, max_wait: float, now: float) -> tuple[list, list]:
    """(the order vLLM walks this step, requests kept out of this step). First requests that waited `max_wait`,
    by arrival; then those needing no new slot (base model, running adapters), by arrival; then the rest by
    adapter, most requests waiting first. While a waited-out request needs a slot and none is free, the running
    adapters' requests sit out the step, so those adapters drain and a slot frees."""
    held = {adapter_of(r) for r in running} - {0}
    waited, no_new_slot, rest = [], [], []
    for request in sorted(waiting, key=lambda r: r.arrival_time):
        adapter = adapter_of(request)
        if now - request.arrival_time >= max_wait:
            waited.append(request)
        elif adapter == 0 or adapter in held:
            no_new_slot.append(request)
        else:
            rest.append(request)
    demand, first = Counter(adapter_of(r) for r in rest), {}
    for request in rest:
        first.setdefault(adapter_of(request), request.arrival_time)
    rest.sort(key=lambda r: (-demand[adapter_of(r)], first[adapter_of(r)]))  # stable: arrival within an adapter
    if len(held) >= max_loras and any(adapter_of(r) not in held | {0} for r in waited):
        ahead = waited + no_new_slot
        return [r for r in ahead if adapter_of(r) not in held] + rest, [r for r in ahead if adapter_of(r) in held]
    return waited + no_new_slot + rest, []


class AdapterAwareScheduler(Scheduler):
    """vLLM's Scheduler with its waiting queue put in `adapter_order` before each step (CPU engines schedule
    synchronously, so subclassing the synchronous Scheduler changes nothing else)."""

    def schedule(self, *args, **kwargs):
        if not self.lora_config or not isinstance(self.waiting, FCFSRequestQueue) or not self.waiting:
            return super().schedule(*args, **kwargs)
        order, kept_out = adapter_order(list(self.waiting), self.running, self.lora_config.max_loras, MAX_WAIT_S,
                                        time.time())
        self.waiting.clear()
        self.waiting.extend(order)
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.waiting.extend(kept_out)


def main() -> None:
    # The engine imports this module for its scheduler: what only the load generator needs is imported here.
    from adapter_admission import ROWS
    from harness import BenchServer, make_adapters, print_table
    from many_adapters import ms, run_row, sequence

    from server.storage.factory import build_registry, build_store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="gateways per policy (alternating order)")
    parser.add_argument("--requests", type=int, default=48, help="requests of the 16- and 64-adapter rows")
    parser.add_argument("--zipf-requests", type=int, default=200, help="requests of the 1,000-name row")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rows", nargs="+", choices=[label for label, _, _ in ROWS], default=[r[0] for r in ROWS])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = [row for row in ROWS if row[0] in args.rows]
    results = {label: {p: [] for p in POLICIES} for label, _, _ in rows}
    bases = {p: [] for p in POLICIES}
    names = (f"s{i}" for i in itertools.count())
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        folders = None
        for round_ in range(args.rounds):
            for policy in POLICIES if round_ % 2 == 0 else POLICIES[::-1]:
                extra = {"LORASERVE_ENGINE_EXTRA_ARGS": "--scheduler-cls engine_scheduling.AdapterAwareScheduler",
                         "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
                with BenchServer(LORASERVE_ENGINE_MAX_LORAS="4", LORASERVE_ENGINE_MAX_CPU_LORAS="16",
                                 LORASERVE_TENANT_MAX_ADAPTERS="100000",
                                 **(extra if policy == POLICIES[1] else {})) as server:
                    engine_log = (server.settings.log_dir / "engine.log").read_text(errors="replace")
                    if (policy == POLICIES[1]) != ("AdapterAwareScheduler" in engine_log):
                        sys.exit(f"the engine of '{policy}' did not run the scheduler it should (see its log)")
                    folders = folders or make_adapters(server.model, Path(tmp), 16)
                    unbounded = server.settings.model_copy(update={"tenant_max_adapters": None})
                    registry = build_registry(unbounded, build_store(server.settings))
                    base_model = [server.settings.served_model_name]
                    base_seq = sequence(0, "-", args.requests, args.seed)
                    asyncio.run(run_row(server, base_model, sequence(0, "-", args.concurrency, args.seed + 99), args))
                    base_runs = [asyncio.run(run_row(server, base_model, base_seq, args))["tokens_per_s"]]
                    for label, n, distribution in rows:
                        seq = sequence(n, distribution, args.zipf_requests if n > 64 else args.requests, args.seed)
                        models = {a: next(names) for a in {a for a, _ in seq}}  # fresh names: loaded nowhere yet
                        for a, name in models.items():
                            registry.publish(folders[a % len(folders)], "bench", name, origin="bench")
                        row = asyncio.run(run_row(server, models, seq, args))
                        results[label][policy].append(row)
                        print(f"{label}, {policy}: {row['tokens_per_s']:.1f} tok/s, p99 TTFT "
                              f"{ms(row['ttft_s'], 0.99)} ms, {len(row['errors'])} errors", flush=True)
                    base_runs.append(asyncio.run(run_row(server, base_model, base_seq, args))["tokens_per_s"])
                    bases[policy].append(statistics.mean(base_runs))
                    for label in results:  # each gateway's rows divide by its own base row
                        results[label][policy][-1]["base_tokens_per_s"] = bases[policy][-1]
    table = []
    for label, _, _ in rows:
        for policy in POLICIES:
            runs = results[label][policy]
            ttft = [t for r in runs for t in r["ttft_s"]]
            table.append([label, policy, " / ".join(f"{r['tokens_per_s']:.1f}" for r in runs),
                          " / ".join(f"{r['tokens_per_s'] / r['base_tokens_per_s']:.2f}" for r in runs),
                          ms(ttft, 0.5), ms(ttft, 0.99), str(sum(len(r["errors"]) for r in runs))])
    print_table(f"Adapter order inside the engine at --max-loras 4 ({args.rounds} gateway(s) per policy; base "
                "tok/s per gateway: " + "; ".join(f"{p} " + ", ".join(f"{b:.1f}" for b in bases[p]) for p in POLICIES)
                + f"); waited-out bound {MAX_WAIT_S:.0f} s; TTFT over all runs of the row",
                ["row", "policy", "tokens/s, each run", "ratio to its base, each run", "TTFT p50 ms", "TTFT p99 ms",
                 "errors"], table, {"bases": bases, "results": results})


if __name__ == "__main__":
    main()
