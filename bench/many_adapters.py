"""How multi-LoRA serving scales with the number of adapters: vLLM through the gateway against the base model
alone, and against Hugging Face PEFT serving one adapter at a time (the S-LoRA paper's baseline).

    make bench            (or: .venv/bin/python bench/many_adapters.py [--requests 24] [--peft-requests 12])

vLLM side: one gateway with its embedded engine, --max-loras 4 and --max-cpu-loras 16 (this script's defaults), so with
16 and 64 adapters the engine must swap adapters in and out. Rows: the base model alone (the baseline), then
1, 4, 16 and 64 rank-8 adapters (random weights), requests spread uniformly or skewed (Zipf, s=1.1) over them
(with one adapter both are the same: one row). Each row has its own adapters (fresh names, published straight
into the registry, so loaded nowhere): no adapter warm-up, the cost of loading each adapter on first use and
of reloading it after eviction counts. The engine itself is warmed first with a few base-model requests, and
the base row runs again after the adapter rows: the mean of its two runs is what every ratio divides by.
Every row gets the same seeded request sequence (prompts, and adapters by rank), the same number of streamed
requests of exactly --max-tokens output tokens (min_tokens = max_tokens with ignore_eos, temperature 0; checked on
every answer), at most --concurrency at a time. TTFT is client-side, from sending a request to its first content
chunk. A failed request counts no tokens, shows in the errors column, and makes the script exit non-zero.

Then the 1,000-adapter row, on the same gateway: --zipf-adapters rank-8 adapters (fresh random weights, ~3.5 MB
each) uploaded through the admin API, --upload-concurrency at a time (each upload is validated and loaded on the
engine once, as an operator's is), then --zipf-requests streamed requests Zipf-skewed (s=1.1) over all of them:
most adapters come from disk into the engine's CPU cache (16) and its slots (4) on first use (the engine reloads
an adapter evicted from its cache by itself, so the gateway's load counter does not see these). Reported: upload
time, the registry's size on disk, distinct adapters asked for, p50/p99 TTFT, errors, and p99 TTFT over the
one-adapter row's.

PEFT side (bench/peft_baseline.py, a child process started after the gateway stopped, so the two never share
the cores): rows base, 1, 16-uniform, 64-uniform and 64-skewed, on the first --peft-requests requests of the
same sequences (PEFT is slow on CPU), all arriving at t=0 and served in order in batches of consecutive
same-adapter requests. In that table vLLM's TTFT is counted the same way, from the start of the run
(client-side queueing included), over the same first requests. PEFT runs with --peft-threads torch threads
(2) and OMP_WAIT_POLICY=PASSIVE; on a 2-core machine the vLLM CPU engine computes on one core (it reserves
the other for its front end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import torch
from harness import REPO, BenchServer, make_adapters, print_table
from safetensors.torch import load_file, save

from adapters.basemodel import ensure_default_model
from server.storage.factory import build_registry, build_store

PROMPTS = ["Tell me a story.", "Name three colors.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain what a CPU does.", "Give me a tip for sleeping well.", "Count to ten.", "Describe a cat."]
ROWS = [("base", 0, "-"), ("1", 1, "uniform = skewed")] + [
    (f"{n}-{d}", n, d) for n in (4, 16, 64) for d in ("uniform", "skewed")]
PEFT_ROWS = ["base", "1", "16-uniform", "64-uniform", "64-skewed"]


def sequence(adapters: int, distribution: str, requests: int, seed: int) -> list[tuple[int | None, int]]:
    """(adapter index, or None for the base model; prompt index) per request, in arrival order."""
    prompts = random.Random(seed).choices(range(len(PROMPTS)), k=requests)
    if adapters == 0:
        return [(None, p) for p in prompts]
    weights = [1.0 / (k + 1) ** 1.1 if distribution == "skewed" else 1.0 for k in range(adapters)]
    picks = random.Random(seed + 1).choices(range(adapters), weights=weights, k=requests)
    return list(zip(picks, prompts, strict=True))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float], q: float) -> str:
    return f"{quantile(values, q) * 1000:.0f}" if values else "-"


def adapter_loads(server: BenchServer) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=server.admin_auth, timeout=10).text
    return sum(float(v) for v in re.findall(r"^loraserve_adapter_loads_total\{[^}]*\} (\S+)$", text, re.M))


class Failed(Exception):
    """The server answered with an error (HTTP status or an error event in the stream)."""


async def stream_one(client: httpx.AsyncClient, server: BenchServer, model: str, prompt: str,
                     max_tokens: int) -> float:
    """Sends one streamed request; the time its first content chunk arrived (perf_counter)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "min_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first, usage, finish = None, None, None
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.auth) as reply:
        if reply.status_code != 200:
            raise Failed(f"{model}: HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise Failed(f"{model}: error event: {line[:300]}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter()
                finish = choice.get("finish_reason") or finish
    assert first is not None, f"{model}: no content"
    assert usage and usage["completion_tokens"] == max_tokens and finish == "length", \
        f"{model}: {usage and usage['completion_tokens']} tokens, finish {finish}, not {max_tokens}"
    return first


async def run_row(server: BenchServer, models: Sequence[str] | Mapping[int, str], seq: list[tuple[int | None, int]],
                  args, gate=None) -> dict:
    """Failed requests count no tokens and no TTFT; they are listed under "errors". A `gate`
    (`adapter_admission.AdapterGate`) holds each request after it is sent, until its adapter may run."""
    limit = asyncio.Semaphore(args.concurrency)
    errors: list[str] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(adapter: int | None, prompt: int) -> tuple[float, float] | None:
            async with limit:
                sent = time.perf_counter()
                model = models[adapter] if adapter is not None else server.settings.served_model_name
                try:
                    async with gate.hold(adapter) if gate else contextlib.nullcontext():
                        first = await stream_one(client, server, model, PROMPTS[prompt], args.max_tokens)
                except Failed as exc:
                    errors.append(str(exc))
                    return None
                return first - sent, first - started

        started = time.perf_counter()
        results = await asyncio.gather(*(one(a, p) for a, p in seq))
        wall = time.perf_counter() - started
    done = [r for r in results if r is not None]
    if errors:
        print(f"{len(errors)} failed requests, first: {errors[0]}", flush=True)
    return {"tokens": len(done) * args.max_tokens, "wall_s": wall, "tokens_per_s": len(done) * args.max_tokens / wall,
            "ttft_s": [r[0] for r in done], "ttft_from_start_s": [r and r[1] for r in results], "errors": errors}


def adapter_files(config: bytes, shapes: dict[str, torch.Size], seed: int) -> list[tuple[str, tuple[str, bytes]]]:
    """A new adapter with this config and weight shapes, fresh random weights: upload parts for the admin API."""
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    return [("files", ("adapter_config.json", config)), ("files", ("adapter_model.safetensors", save(weights)))]


async def upload_all(server: BenchServer, template: Path, names: list[str], concurrency: int) -> None:
    """Uploads every adapter (shaped like `template`) as an operator would, one adapter a call; exits at the
    first refusal."""
    config = (template / "adapter_config.json").read_bytes()
    shapes = {name: t.shape for name, t in load_file(template / "adapter_model.safetensors").items()}
    limit, refused = asyncio.Semaphore(concurrency), []
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int, name: str) -> None:
            files = adapter_files(config, shapes, 10_000 + i)
            async with limit:
                if refused:
                    return
                reply = await client.post(f"{server.url}/admin/tenants/bench/adapters", headers=server.admin_auth,
                                          data={"name": name}, files=files)
            if reply.status_code != 201:
                refused.append(f"upload of {name} failed: HTTP {reply.status_code}: {reply.text[:300]}")
            elif (i + 1) % 100 == 0:
                print(f"uploaded {i + 1}/{len(names)}", flush=True)

        await asyncio.gather(*(one(i, name) for i, name in enumerate(names)))
    if refused:
        sys.exit(refused[0])


def run_zipf_row(server: BenchServer, template: Path, args, phases: dict[str, float]) -> dict:
    names = [f"z-a{i}" for i in range(args.zipf_adapters)]
    began = time.monotonic()
    asyncio.run(upload_all(server, template, names, args.upload_concurrency))
    phases["uploads"] = upload_s = time.monotonic() - began
    registry = server.settings.registry_path / "bench"
    size = sum(f.stat().st_size for name in names for f in (registry / name).rglob("*") if f.is_file())
    seq = sequence(len(names), "skewed", args.zipf_requests, args.seed)
    began = time.monotonic()
    row = asyncio.run(run_row(server, names, seq, args))
    phases[f"{len(names)}-adapter row"] = time.monotonic() - began
    row.update(upload_s=upload_s, registry_bytes=size, distinct=len({a for a, _ in seq}))
    print(f"vllm {len(names)}-zipf: {row['tokens_per_s']:.1f} tok/s", flush=True)
    return row


def both_runs(first: dict, last: dict) -> dict:
    """The base row measured first and last as one row: mean tokens/s, both runs' TTFTs; the PEFT table's
    TTFT-from-start stays the first run's, the one whose queue it compares."""
    runs = [first["tokens_per_s"], last["tokens_per_s"]]
    return {**first, "tokens_per_s": statistics.mean(runs), "runs_tokens_per_s": runs,
            "ttft_s": first["ttft_s"] + last["ttft_s"], "errors": first["errors"] + last["errors"]}


def run_vllm(args, folders: list[Path], phases: dict[str, float]) -> dict:
    results = {}
    with BenchServer(LORASERVE_ENGINE_MAX_LORAS=str(args.max_loras),
                     LORASERVE_ENGINE_MAX_CPU_LORAS=str(args.max_cpu_loras),
                     LORASERVE_TENANT_MAX_ADAPTERS=str(sum(n for _, n, _ in ROWS) + args.zipf_adapters)) as server:
        phases["engine start"] = server.start_seconds
        began = time.monotonic()
        store = build_store(server.settings)
        # fresh names per row, 169 in all: over the default quota of 100 names per tenant
        registry = build_registry(server.settings.model_copy(update={"tenant_max_adapters": None}), store)
        for label, n, _ in ROWS:  # fresh names per row: nothing is loaded before its row
            for i in range(n):
                registry.publish(folders[i], "bench", f"r{label}-a{i}", origin="bench")
        phases["publish"] = time.monotonic() - began
        began = time.monotonic()
        base_model = server.settings.served_model_name
        asyncio.run(run_row(server, [base_model], sequence(0, "-", args.concurrency, args.seed + 99), args))
        for label, n, distribution in ROWS:
            loads = adapter_loads(server)
            seq = sequence(n, distribution, args.requests, args.seed)
            results[label] = asyncio.run(run_row(server, [f"r{label}-a{i}" for i in range(n)], seq, args))
            results[label]["adapter_loads"] = adapter_loads(server) - loads
            print(f"vllm {label}: {results[label]['tokens_per_s']:.1f} tok/s", flush=True)
        # The base row again, last: every ratio divides by it, so one slow or fast run of it would move them all.
        again = asyncio.run(run_row(server, [base_model], sequence(0, "-", args.requests, args.seed), args))
        print(f"vllm base, again: {again['tokens_per_s']:.1f} tok/s", flush=True)
        results["base"] = both_runs(results["base"], again)
        phases["vLLM rows"] = time.monotonic() - began
        if args.zipf_adapters:
            results["zipf"] = run_zipf_row(server, folders[0], args, phases)
    return results


def run_peft(args, folders: list[Path], model: Path) -> dict:
    """The PEFT rows in a child process (bench/peft_baseline.py), alone on the machine's cores."""
    rows = [{"label": label, "adapters": n,
             "sequence": sequence(n, dist, args.requests, args.seed)[:args.peft_requests]}
            for label, n, dist in ROWS if label in PEFT_ROWS]
    job = {"model": str(model), "folders": [str(f) for f in folders], "prompts": PROMPTS, "rows": rows,
           "concurrency": args.concurrency, "max_tokens": args.max_tokens, "threads": args.peft_threads}
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("peft_baseline.py"))], input=json.dumps(job),
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"the PEFT baseline failed:\n{done.stderr[-3000:]}")
    print("".join(line for line in done.stderr.splitlines(True) if line.startswith("peft ")), end="")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per vLLM row")
    parser.add_argument("--peft-requests", type=int, default=12, help="first requests of each sequence for PEFT")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--peft-threads", type=int, default=2, help="torch threads of the PEFT baseline")
    parser.add_argument("--max-loras", type=int, default=4, help="engine slots (adapters in one batch)")
    parser.add_argument("--max-cpu-loras", type=int, default=16, help="adapters the engine keeps in memory")
    parser.add_argument("--zipf-adapters", type=int, default=1000, help="adapters of the last row (0: no row)")
    parser.add_argument("--zipf-requests", type=int, default=200, help="requests of the last row")
    parser.add_argument("--upload-concurrency", type=int, default=4, help="admin API uploads at once")
    args = parser.parse_args()
    args.peft_requests = min(args.peft_requests, args.requests)
    began, phases = time.monotonic(), {}
    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_default_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
        folders = make_adapters(model, Path(tmp), max(n for _, n, _ in ROWS))
        phases["make adapters"] = time.monotonic() - began
        vllm = run_vllm(args, folders, phases)
        peft_began = time.monotonic()
        peft = run_peft(args, folders, model)
        phases["PEFT"] = time.monotonic() - peft_began
    phases["whole benchmark"] = time.monotonic() - began

    base = vllm["base"]["tokens_per_s"]
    rows = [[label, dist, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base:.2f}", ms(r["ttft_s"], 0.5),
             ms(r["ttft_s"], 0.99), f"{r['adapter_loads']:.0f}", str(len(r["errors"]))]
            for (label, _, dist), r in ((row, vllm[row[0]]) for row in ROWS)]
    print_table(f"vLLM through the gateway (--max-loras {args.max_loras}, --max-cpu-loras {args.max_cpu_loras}): "
                f"{args.requests} streamed requests of "
                f"{args.max_tokens} tokens per row (same seeded sequence), {args.concurrency} concurrent; no adapter "
                "warm-up: first loads and swaps are counted; the base row ran first and last ("
                + ", ".join(f"{t:.1f}" for t in vllm["base"]["runs_tokens_per_s"]) + " tok/s), its mean the ratios' "
                "baseline", ["adapters", "distribution", "output tokens/s",
                "ratio to base", "TTFT p50 ms", "TTFT p99 ms", "adapter loads", "errors"],
                rows, {"vllm": vllm, "phases_s": phases})

    if "zipf" in vllm:
        z, one = vllm["zipf"], vllm["1"]
        print_table(f"{args.zipf_adapters} adapters uploaded through the admin API ({args.upload_concurrency} at a "
                    f"time), then {args.zipf_requests} streamed requests of {args.max_tokens} tokens Zipf-skewed "
                    f"(s=1.1) over them ({z['distinct']} distinct), {args.concurrency} concurrent; "
                    f"{args.max_loras} engine slots, {args.max_cpu_loras} in its CPU cache",
                    ["adapters", "upload s", "registry MB on disk", "output tokens/s", "ratio to base", "TTFT p50 ms",
                     "TTFT p99 ms", "p99 TTFT / one adapter's", "errors"],
                    [[str(args.zipf_adapters), f"{z['upload_s']:.0f}", f"{z['registry_bytes'] / 1e6:.0f}",
                      f"{z['tokens_per_s']:.1f}", f"{z['tokens_per_s'] / base:.2f}", ms(z["ttft_s"], 0.5),
                      ms(z["ttft_s"], 0.99), f"{quantile(z['ttft_s'], 0.99) / quantile(one['ttft_s'], 0.99):.2f}"
                      if z["ttft_s"] else "-", str(len(z["errors"]))]],
                    {"zipf": z})

    rows = []
    for label in PEFT_ROWS:
        p, v = peft[label], vllm[label]
        prefix = [t for t in v["ttft_from_start_s"][:args.peft_requests] if t is not None]
        rows.append([label, f"{v['tokens_per_s']:.1f}", f"{p['tokens_per_s']:.1f}",
                     f"{v['tokens_per_s'] / p['tokens_per_s']:.2f}", ms(prefix, 0.5), ms(p["ttft_s"], 0.5),
                     ms(prefix, 0.99), ms(p["ttft_s"], 0.99), f"{p['load_s']:.1f}"])
    print_table(f"vLLM (gateway) vs HF PEFT one adapter at a time ({args.peft_threads} torch threads): vLLM tok/s over "
                f"{args.requests} requests, PEFT over the first {args.peft_requests} of the same sequence (batches <= "
                f"{args.concurrency}); TTFT from the start of the run (queueing included), over those first requests",
                ["row", "vLLM tok/s", "PEFT tok/s", "ratio vLLM/PEFT", "vLLM TTFT p50 ms", "PEFT TTFT p50 ms",
                 "vLLM TTFT p99 ms", "PEFT TTFT p99 ms", "PEFT s to load its adapters (untimed)"],
                rows, {"peft": peft})
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    failed = sum(len(r["errors"]) for r in vllm.values())
    if failed:
        sys.exit(f"{failed} vLLM requests failed (see the errors column)")


if __name__ == "__main__":
    main()
