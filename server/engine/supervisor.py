"""The embedded engine: vLLM's OpenAI server as a supervised child process.

Started in its own process group (vLLM forks workers) and bound to a private address; restarted with
a growing back-off when it dies; stopped with SIGTERM then SIGKILL for the whole group. Its output goes
to `<data_dir>/logs/engine.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from server.config import Settings

log = logging.getLogger("loraserve.engine")


def engine_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(settings.model_path),
        "--served-model-name", settings.served_model_name,
        "--host", settings.engine_host, "--port", str(settings.engine_port),
        "--dtype", settings.engine_dtype,
        "--max-model-len", str(settings.engine_max_model_len),
        "--gpu-memory-utilization", str(settings.engine_memory_utilization),
        "--enable-lora",
        "--max-loras", str(settings.engine_max_loras),
        "--max-lora-rank", str(settings.engine_max_lora_rank),
        "--max-cpu-loras", str(settings.engine_max_cpu_loras),
        "--enforce-eager",
        *settings.engine_extra_args,
    ]


def engine_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_NO_USAGE_STATS": "1",  # no telemetry calls from a private server
        "HF_HUB_OFFLINE": "1",  # the model is local; never reach for a hub
        "TRANSFORMERS_OFFLINE": "1",
    })
    return env


class EngineSupervisor:
    def __init__(
        self, settings: Settings, *, is_ready: Callable[[], Awaitable[bool]],
        on_restart: Callable[[], None] = lambda: None,
    ):
        self.settings = settings
        self.is_ready = is_ready
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
        """Spawn the engine and watch it; returns at once (readiness is the pool's health check)."""
        self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def _spawn(self) -> None:
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.settings.log_dir / "engine.log"
        with log_path.open("ab") as out:
            self.process = subprocess.Popen(
                engine_command(self.settings), env=engine_env(self.settings), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._spawned_at = time.monotonic()
        log.info("engine started (pid %s, port %s, log %s)", self.process.pid, self.settings.engine_port, log_path)

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
            log.error("engine exited with code %s; restarting in %.0f s (restart %d)",
                      self.process.returncode, backoff, self.restarts)
            self.on_restart()
            await asyncio.sleep(backoff)
            if not self._stopping:
                self._spawn()
            backoff = min(backoff * 2, 60.0)

    async def _check_start(self) -> None:
        age = time.monotonic() - self._spawned_at
        if await self.is_ready():
            self.ready.set()
            log.info("engine ready after %.0f s", age)
        elif age > self.settings.engine_start_timeout:
            # Hung in start-up: kill it; the watch loop then restarts it like any other death.
            log.error("engine not ready after %.0f s; killing it", age)
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
        log.info("engine stopped")

    def _kill_group(self, sig: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)
