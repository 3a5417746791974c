"""vLLM's own load generator (`vllm bench serve`) against the gateway.

Guards that vLLM's benchmark client, which sends `ignore_eos`, works through the
gateway: it got a 400 on every request before.
"""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_vllm_bench_serve_completes_every_request(gateway, base_model_path, tmp_path):
    # Unbuffered, with faulthandler: a client that dies by a signal (CI once saw SIGILL, with nothing printed)
    # shows where.
    env = dict(os.environ, OPENAI_API_KEY=gateway.tenants["alpha"].key,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "server.cli", "vllm", "bench", "serve",  # `loraserve vllm ...`: see vllm_cli.py
           "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
           "--base-url", gateway.url, "--model", "support", "--tokenizer", str(base_model_path),
           "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8",
           "--num-prompts", "8", "--ignore-eos", "--save-result", "--result-dir", str(tmp_path),
           "--result-filename", "result.json"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == 8, result
    assert result.get("failed", 0) == 0, result
