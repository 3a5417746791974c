"""A gateway with its embedded engine in a child process, on free loopback ports, for benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.basemodel import ensure_default_model  # noqa: E402
from server.config import Settings  # noqa: E402
from server.services import build_store  # noqa: E402

ADMIN_KEY = "bench-admin-key"
# Share of RAM for an engine (weights, activations, ~1 GiB of KV cache): plenty for these requests, and
# small enough that a benchmark can run a second engine or a PEFT baseline beside it.
ENGINE_MEMORY_SHARE = "0.15"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    """`with BenchServer() as server:` a ready gateway with one tenant (`bench`) and its key."""

    def __init__(self, **extra_env: str):
        self.extra_env = extra_env  # more environment (LORASERVE_* settings) for the gateway and its engine

    def __enter__(self) -> BenchServer:
        self.model = ensure_default_model(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
        self._tmp = tempfile.TemporaryDirectory()
        data = Path(self._tmp.name)
        self.port, self.engine_port = free_port(), free_port()
        self.url, self.engine_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.engine_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
        env.update(LORASERVE_DATA_DIR=str(data), LORASERVE_PORT=str(self.port),
                   LORASERVE_ENGINE_PORT=str(self.engine_port), LORASERVE_BASE_MODEL_PATH=str(self.model),
                   LORASERVE_ADMIN_KEY=ADMIN_KEY, LORASERVE_LOG_LEVEL="warning",
                   LORASERVE_ENGINE_MEMORY_UTILIZATION=ENGINE_MEMORY_SHARE, **self.extra_env)
        self.env = env
        self.settings = Settings(_env_file=None, data_dir=data, base_model_path=self.model)
        store = build_store(self.settings)
        store.create_tenant("bench")
        _, self.key = store.create_key("bench")
        started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "gateway"], env=env, cwd=REPO,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()
        self.start_seconds = time.monotonic() - started
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(60)
        self._tmp.cleanup()

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                sys.exit("the gateway exited")
            time.sleep(0.25)
        sys.exit("the gateway did not become ready")

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def admin_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}


def print_table(title: str, header: list[str], rows: list[list[str]], data: dict | None = None) -> None:
    """Print a Markdown table; under `python -m bench` also record it (and `data`, raw numbers) in the
    run's JSON results file."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    results = os.environ.get("BENCH_RESULTS")
    if results:
        record = {"benchmark": Path(sys.argv[0]).stem, "title": title, "header": header, "rows": rows,
                  "data": data or {}}
        with open(results, "a") as out:  # one JSON object per line; `python -m bench` gathers them
            out.write(json.dumps(record) + "\n")


def make_adapters(base_model: Path, out: Path, count: int, std: float = 0.02) -> list[Path]:
    """`count` rank-8 PEFT adapters on q/k/v/o with random weights (normal, `std`), seeded 0..count-1."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    folders = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, std)
        peft_model.save_pretrained(out / f"a{i}")
        folders.append(out / f"a{i}")
    return folders
