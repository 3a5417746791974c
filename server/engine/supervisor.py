"""Child processes the gateway keeps alive: the embedded engine (vLLM's OpenAI server) and the worker.

Each runs in its own process group (vLLM forks workers), is restarted with a growing back-off when it
dies, and is stopped with SIGTERM then SIGKILL for the whole group. Output goes to `<data_dir>/logs/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from server.config import Settings
from server.engine.chat_template import engine_tool_args
from server.engine.vllm_fix import GROUPED_OPS_ENV

log = logging.getLogger("loraserve.supervisor")


def engine_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(settings.model_path),
        "--served-model-name", settings.served_model_name,
        "--host", settings.engine_host, "--port", str(settings.engine_port),
        "--dtype", settings.engine_dtype,
        "--max-model-len", str(settings.engine_max_model_len),
        "--gpu-memory-utilization", str(settings.engine_memory_utilization),
        *(["--kv-cache-memory-bytes", str(settings.engine_kv_cache_bytes)] if settings.engine_kv_cache_bytes else []),
        "--enable-lora",
        "--max-loras", str(settings.engine_max_loras),
        "--max-lora-rank", str(settings.engine_max_lora_rank),
        "--max-cpu-loras", str(settings.engine_max_cpu_loras),
        "--enforce-eager",
        # One grammar library for every request. vLLM's "auto" picks one per request (xgrammar, else guidance) but
        # compiles all of them with the library of the first structured request the engine was sent: whichever
        # tenant came first decided whether others' schemas or tool calls failed inside the engine (a 503).
        # xgrammar reads the structural tags of tool calls; what it lacks is a 400 before the engine.
        "--structured-outputs-config", json.dumps({"backend": "xgrammar"}),
        *engine_tool_args(settings),
        *settings.engine_extra_args,
    ]


# What the engine may inherit from the gateway's environment: the system's basics, locale, the Python
# and library search paths, and the knobs of vLLM, PyTorch, the accelerator and the thread pools. Nothing
# else: the gateway's LORASERVE_* settings hold the admin key and the database URL, and the engine, which
# loads whatever path it is sent, needs neither.
_ENGINE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "LANG", "LANGUAGE", "TMPDIR", "TEMP", "TMP",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "LD_PRELOAD", "XDG_CACHE_HOME", "TRANSFORMERS_CACHE", "SSL_CERT_FILE", "SSL_CERT_DIR",
})
_ENGINE_ENV_PREFIXES = (
    "LC_", "VLLM_", "HF_", "TORCH", "TRITON_", "CUDA_", "NVIDIA_", "NCCL_", "HIP_", "ROCM_", "ROCR_", "OMP_",
    "KMP_", "MKL_", "OPENBLAS_", "GOMP_", "ONEDNN_", "DNNL_", "NUMEXPR_",
)
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")  # HF_TOKEN, VLLM_API_KEY: never passed


def engine_env_allows(name: str) -> bool:
    if any(word in name.upper() for word in _SECRET_WORDS):
        return False
    return name in _ENGINE_ENV_NAMES or name.startswith(_ENGINE_ENV_PREFIXES)


def engine_env(settings: Settings) -> dict[str, str]:
    """The engine's environment: an allowlist of the gateway's (see above), plus what it must have."""
    env = {name: value for name, value in os.environ.items() if engine_env_allows(name)}
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_NO_USAGE_STATS": "1",  # no telemetry calls from a private server
        "HF_HUB_OFFLINE": "1",  # the model is local; never reach for a hub
        "TRANSFORMERS_OFFLINE": "1",
        GROUPED_OPS_ENV: str(settings.engine_grouped_lora_ops).lower(),  # read by the vLLM plugin in the engine
    })
    return env


def worker_command() -> list[str]:
    return [sys.executable, "-m", "server.cli", "worker"]


class ChildSupervisor:
    def __init__(
        self, name: str, command: list[str], env: dict[str, str], log_path: Path, *,
        is_ready: Callable[[], Awaitable[bool]] | None = None, start_timeout: float = float("inf"),
        on_restart: Callable[[], None] = lambda: None,
    ):
        self.name, self.command, self.env, self.log_path = name, command, env, log_path
        self.is_ready = is_ready
        self.start_timeout = start_timeout
        self.on_restart = on_restart
        self.ready = asyncio.Event()
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = False
        self._spawned_at = 0.0
        self._task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        """Spawn the child and watch it; returns at once."""
        self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._spawned_at = time.monotonic()
        log.info("%s started (pid %s, log %s)", self.name, self.process.pid, self.log_path)

    async def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self._stopping or self.process is None:
                continue
            if self.process.poll() is None:
                if not self.ready.is_set():
                    await self._check_start()
                continue
            self.ready.clear()
            self._kill_group(signal.SIGKILL)  # its workers may outlive it
            self.restarts += 1
            if time.monotonic() - self._spawned_at > 300:
                backoff = 1.0  # it had been healthy for a while: not a crash loop
            log.error("%s exited with code %s; restarting in %.0f s (restart %d)",
                      self.name, self.process.returncode, backoff, self.restarts)
            self.on_restart()
            await asyncio.sleep(backoff)
            if not self._stopping:
                self._spawn()
            backoff = min(backoff * 2, 60.0)

    async def _check_start(self) -> None:
        age = time.monotonic() - self._spawned_at
        if self.is_ready is None or await self.is_ready():
            self.ready.set()
            log.info("%s ready after %.0f s", self.name, age)
        elif age > self.start_timeout:
            # Hung in start-up: kill it; the watch loop then restarts it like any other death.
            log.error("%s not ready after %.0f s; killing it", self.name, age)
            self._kill_group(signal.SIGKILL)

    async def stop(self, grace: float = 20.0) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
        if self.process is None or self.process.poll() is not None:
            self._kill_group(signal.SIGKILL)
            return
        self._kill_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self._kill_group(signal.SIGKILL)
        self.process.wait()
        log.info("%s stopped", self.name)

    def _kill_group(self, sig: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
