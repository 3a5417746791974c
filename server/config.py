"""The one Settings object. Nothing else in the code reads the environment.

Every field can be set as an environment variable with the prefix `LORASERVE_` (for example
`LORASERVE_PORT=9000`) or in a `.env` file. Paths default to places under `data_dir`.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.basemodel import DEFAULT_MODEL_ID, DEFAULT_SERVED_NAME


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_", env_file=".env", extra="ignore")

    # Gateway
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, description="Port the gateway listens on.")
    data_dir: Path = Field(Path("data"), description="Folder for the database, registry, models and logs.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir.")
    registry_dir: Path | None = Field(None, description="Adapter registry; default: data_dir/registry.")
    admin_key: SecretStr | None = Field(
        None, description="Admin API key. When unset, `loraserve up` makes one once and prints it."
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token that may read GET /metrics (and nothing else); Prometheus sends it. "
        "An admin key may read /metrics too; tenant keys never can.",
    )
    auth_mode: Literal["key", "header"] = Field(
        "key",
        description="`key`: tenants authenticate with API keys. `header`: trust X-Tenant-ID alone "
        "(only behind a proxy that authenticates tenants itself).",
    )
    default_model_alias: str | None = Field(
        None, description="Extra `model` name meaning the tenant's default adapter (besides `default`)."
    )
    log_level: str = Field("info", description="Log level of the gateway.")
    log_format: Literal["json", "text"] = Field("json", description="JSON lines (one per record), or plain text.")
    console: bool = Field(
        True, description="Serve the operator console at /console (it signs in with the admin key); false: 404."
    )
    run_worker: bool = Field(
        False, description="Run the training worker as a supervised child of the gateway (`loraserve up` does)."
    )
    worker_threads: int | None = Field(None, ge=1, description="CPU threads a training job may use.")
    worker_heartbeat_timeout: float = Field(
        60.0, gt=0, description="Seconds without a heartbeat before a running job's worker counts as dead."
    )
    max_in_flight: int = Field(
        256, ge=1, description="Sequences (prompts x n) the gateway serves at once; beyond it, 503 with "
        "Retry-After."
    )
    tenant_max_concurrent_requests: int | None = Field(
        16, ge=1, description="Concurrent sequences (prompts x n) per tenant when its own limits do not say "
        "(fair sharing).",
    )
    tenant_contended_concurrency: int | None = Field(
        2, ge=1, description="Concurrent sequences per tenant while other tenants are active: the rest of its "
        "requests (up to its own limit) wait for a turn. Every sequence in a CPU engine's batch slows the others; "
        "raise it on GPUs, where batching is nearly free. Unset: no contended share.",
    )
    tenant_queue_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait for its tenant's turn before it is refused (429).",
    )
    tenant_refusal_hold: float = Field(
        1.0, ge=0, le=30, description="Seconds a request over its tenant's own limits waits for room before its "
        "429: a client that retries at once is slowed to about one try a second per connection instead of "
        "spending the engine's CPU on refusals. 0: refuse at once.",
    )
    redis_url: SecretStr | None = Field(
        None, description="Redis (`redis://host:6379/0`, `rediss://...`, `unix:///path`) where all gateways count the "
        "tenant limits together: concurrent sequences, requests and tokens per minute. Unset: each gateway counts "
        "its own. While it does not answer, each gateway counts on its own (fail open to per-gateway limits; "
        "logged, `loraserve_limits_store_up` 0).",
    )
    cache_salt_secret: SecretStr | None = Field(
        None, description="Secret the per-tenant prefix-cache salts are derived from; give every gateway that "
        "shares engines the same one. Unset: made once and kept in data_dir/cache-salt.secret.",
    )
    max_request_bytes: int = Field(8 << 20, ge=1024, description="Largest request body, uploads aside (413).")
    max_prompts_per_request: int = Field(
        16, ge=1, le=1024, description="Most prompts in one /v1/completions request (each runs `n` sequences)."
    )
    max_upload_bytes: int = Field(512 << 20, ge=1024, description="Largest adapter upload (413).")
    max_training_file_bytes: int = Field(
        100 << 20, ge=1024, description="Largest training file (`POST /v1/files`, 413); also the most a job reads."
    )
    tenant_max_files: int | None = Field(100, ge=1, description="Files one tenant may store (409 beyond).")
    tenant_max_file_bytes: int | None = Field(
        1 << 30, ge=1024, description="Bytes of files one tenant may store, all together (413 beyond)."
    )
    tenant_max_active_jobs: int | None = Field(
        4, ge=1, description="Fine-tuning jobs one tenant may have validating, queued or running (429 beyond)."
    )
    tenant_max_adapters: int | None = Field(
        100, ge=1, description="Adapters (names) one tenant may have; a new name beyond it is refused (409)."
    )
    tenant_max_adapter_bytes: int | None = Field(
        10 << 30, ge=1024, description="Bytes of adapter versions one tenant may keep, all versions together; a "
        "version beyond it is refused (413)."
    )
    archive_max_files: int = Field(16, ge=2, description="Most entries an uploaded archive may hold.")
    archive_max_unpacked_bytes: int = Field(1 << 30, ge=1024, description="Most bytes an archive may unpack to.")

    # Base model
    base_model_path: Path | None = Field(
        None, description="Local Hugging Face model folder; default: SmolLM2-135M-Instruct, prepared once."
    )
    base_model_id: str = Field(DEFAULT_MODEL_ID, description="Hugging Face id of the base model.")
    served_model_name: str = Field(DEFAULT_SERVED_NAME, description="The base model's `model` name.")

    # Engines
    engine_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated vLLM server URLs. Empty: run one engine as a supervised child.",
    )
    engine_routing: Literal["affinity", "round_robin"] = Field(
        "affinity",
        description="How requests are spread over several engines: `affinity` sends an adapter's requests "
        "to the engine that holds it while that engine has capacity; `round_robin` ignores adapters.",
    )
    engine_capacity: int = Field(
        64, ge=1, description="Requests one engine runs at once before affinity routing spills an adapter's "
        "traffic to another engine.",
    )
    engine_health_interval: float = Field(
        2.0, gt=0, description="Seconds between engine health checks (an engine that fails one leaves rotation)."
    )
    engine_max_failures: int = Field(
        3, ge=1, description="Consecutive failed connections to an engine (no passing health check or answer "
        "between them) before it leaves rotation; a failed health check takes it out at once."
    )
    base_through_zero_adapter: bool = Field(
        False, description="Serve base-model requests through an all-zero adapter. Only for engines NOT started "
        "from this installation on CPUs: vLLM's CPU LoRA ops give base-model rows of a mixed batch the last "
        "adapter slot, which this package's vLLM plugin fixes in the engines it starts. Costs a --max-loras "
        "slot and, on CPUs, most of the base model's throughput.",
    )
    engine_host: str = Field("127.0.0.1", description="Address of the embedded engine (private).")
    engine_port: int = Field(8001, description="Port of the embedded engine.")
    engine_max_loras: int = Field(
        16, ge=1, description="Adapters in one batch on the engine (--max-loras); each slot costs the engine a "
        "rank-sized copy of every LoRA-wrapped weight (~25 MB at rank 16 for SmolLM2-135M).")
    engine_max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank (--max-lora-rank).")
    engine_max_cpu_loras: int = Field(
        64, ge=1, description="Adapters cached in CPU memory (--max-cpu-loras); at least engine_max_loras.")
    engine_max_model_len: int = Field(2048, ge=16, description="Context window (--max-model-len).")
    engine_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of memory for the engine (--gpu-memory-utilization); sizes the KV cache "
        "only when engine_kv_cache_bytes is 0.",
    )
    engine_kv_cache_bytes: int = Field(
        1 << 30, ge=0, description="KV cache size in bytes (--kv-cache-memory-bytes; 1 GiB holds ~23k tokens of "
        "SmolLM2). 0: what the memory share leaves, which vLLM's CPU worker works out from its NUMA node's total "
        "and which fails to start on small nodes. Use 0 with a share of 0.9 on GPUs.",
    )
    engine_dtype: str = Field("float32", description="Weights dtype (--dtype); float32 on CPUs.")
    engine_tool_call_parser: str = Field(
        "hermes", max_length=64, description="vLLM's tool-call parser for the embedded engine (--tool-call-parser, "
        "with --enable-auto-tool-choice); empty turns tool calling off. hermes fits ChatML models such as the "
        "default SmolLM2, which are given a ChatML template with tools when their own has none.",
    )
    engine_tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter", description="How far the engine constrains tool calls (--tool-strict-level): `parameter` makes "
        "every call's arguments follow its schema, as if each tool were `strict`.",
    )
    engine_grouped_lora_ops: bool = Field(
        True, description="CPU engines: this package's vLLM plugin computes LoRA one matmul per adapter slot "
        "instead of vLLM's per-token weight gather (same results; server/engine/grouped_lora_ops.py). false: "
        "vLLM's own ops (base-model rows of mixed batches still get no adapter).",
    )
    engine_chat_template: Path | None = Field(
        None, description="A chat template file for the embedded engine (--chat-template). Default: the model's "
        "own, or this package's ChatML template with tools for a ChatML model whose own has no tools.",
    )
    engine_extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More vLLM server flags, space-separated."
    )
    engine_start_timeout: float = Field(900.0, description="Seconds to wait for the engine to become ready.")
    engine_read_timeout: float = Field(
        300.0, description="Seconds without a byte from a streaming engine response before it fails, and how long "
        "the engine's /health may take to answer while a non-streamed request waits on it."
    )
    engine_request_timeout: float = Field(
        600.0, gt=0, description="Most seconds a non-streamed engine request may take in total (it sends no byte "
        "until done, so it is bounded by this and by the engine's liveness, not by engine_read_timeout)."
    )

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _split_urls(cls, value):
        if isinstance(value, str):
            return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        return value

    @field_validator("engine_host")
    @classmethod
    def _private_engine(cls, value: str) -> str:
        """The engine trusts any adapter name and path it is sent: it must never face tenants."""
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            if value != "localhost":
                raise ValueError("engine_host must be a loopback or private IP address (or localhost)") from None
            return value
        if not (address.is_loopback or address.is_private) or address.is_unspecified:
            raise ValueError(f"engine_host {value} is not a loopback or private address; the engine must stay private")
        return value

    @field_validator("engine_extra_args", mode="before")
    @classmethod
    def _split_args(cls, value):
        args = value.split() if isinstance(value, str) else value
        if any(a.split("=")[0] in ("--host", "--port") for a in args):
            raise ValueError("set the engine's address with LORASERVE_ENGINE_HOST/PORT, not extra args")
        return args

    @model_validator(mode="after")
    def _cpu_cache_holds_the_slots(self):
        """vLLM refuses to start with fewer CPU-cached adapters than slots: say so before starting it."""
        if self.engine_max_cpu_loras < self.engine_max_loras:
            raise ValueError(f"engine_max_cpu_loras ({self.engine_max_cpu_loras}) must be at least engine_max_loras "
                             f"({self.engine_max_loras})")
        return self

    @property
    def embedded_engine(self) -> bool:
        return not self.engine_urls

    @cached_property
    def registry_path(self) -> Path:
        return (self.registry_dir or self.data_dir / "registry").resolve()

    @cached_property
    def model_path(self) -> Path:
        return (self.base_model_path or self.data_dir / "models" / DEFAULT_SERVED_NAME).resolve()

    @property
    def uses_default_model(self) -> bool:
        return self.base_model_path is None

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loraserve.db').resolve()}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def as_env(self) -> dict[str, str]:
        """These settings as LORASERVE_* variables, so a child process (the worker) sees the same."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ("," if name == "engine_urls" else " ").join(value)
            env[f"LORASERVE_{name.upper()}"] = str(value)
        return env

    def engine_base_urls(self) -> list[str]:
        if self.engine_urls:
            return list(self.engine_urls)
        return [f"http://{self.engine_host}:{self.engine_port}"]
