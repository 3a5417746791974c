"""The long-lived parts of a running gateway, built once from Settings and shared by all requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from adapters.registry import Registry
from adapters.zero import ENGINE_NAME as ZERO_ENGINE_NAME
from adapters.zero import ensure_zero_adapter
from server.config import Settings
from server.engine.client import EngineClient
from server.engine.pool import EnginePool, PoolObserver
from server.engine.supervisor import ChildSupervisor, engine_command, engine_env, worker_command
from server.observability.metrics import Metrics
from server.observability.metrics_state import metrics_state
from server.observability.traffic import TrafficHistory
from server.publishing.canary import CanaryWatch
from server.serving.cache_salt import CacheSalts, load_or_create_secret
from server.serving.limits import Limiter
from server.serving.shared_counts import SharedCounts
from server.storage.factory import build_registry, build_store
from server.storage.jobstore import JobStore
from server.storage.store import Store

log = logging.getLogger("loraserve.services")
ZERO_FOLDER = ".base-zero"  # in the registry, so every engine sees it at the same path


@dataclass
class Services:
    settings: Settings
    store: Store
    registry: Registry
    pool: EnginePool
    metrics: Metrics
    limiter: Limiter
    jobs: JobStore
    cache_salts: CacheSalts
    supervisor: ChildSupervisor | None = None  # the embedded engine
    worker: ChildSupervisor | None = None
    draining: bool = False
    evaluating: set[str] = field(default_factory=set)  # tenants with an evaluation running (one at a time)
    traffic: TrafficHistory = field(init=False)  # the console's recent traffic, from `metrics`
    canaries: CanaryWatch = field(default_factory=CanaryWatch)  # this gateway's counts of running canaries

    def __post_init__(self) -> None:
        self.traffic = TrafficHistory(self.metrics)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        store = build_store(settings)
        registry = build_registry(settings, store)
        clients = [EngineClient(url, read_timeout=settings.engine_read_timeout,
                                request_timeout=settings.engine_request_timeout)
                   for url in settings.engine_base_urls()]
        metrics = Metrics(state=lambda: metrics_state(store, pool))  # read at scrape time, pool set below
        shared = None
        if settings.redis_url is not None:
            shared = SharedCounts(settings.redis_url.get_secret_value(), on_state=metrics.limits_store)
        pool = EnginePool(
            clients, observer=_MetricsObserver(metrics, store), routing=settings.engine_routing,
            capacity=settings.engine_capacity, max_failures=settings.engine_max_failures, leases=shared,
        )
        supervisor = worker = None
        if settings.embedded_engine:
            supervisor = ChildSupervisor(
                "engine", engine_command(settings), engine_env(settings), settings.log_dir / "engine.log",
                is_ready=pool.healthy, start_timeout=settings.engine_start_timeout,
                on_restart=lambda: (pool.mark_down(pool.slots[0]), metrics.engine_restarts.inc()),
            )
        if settings.run_worker:
            env = {**engine_env(settings), **settings.as_env(), "LORASERVE_RUN_WORKER": "false"}
            for name in type(settings).model_fields:  # the database it needs; the secrets (admin key...) never
                if hasattr(getattr(settings, name), "get_secret_value"):
                    env.pop(f"LORASERVE_{name.upper()}", None)
            worker = ChildSupervisor("worker", worker_command(), env, settings.log_dir / "worker.log")
        limiter = Limiter(settings.max_in_flight, contended_share=settings.tenant_contended_concurrency,
                          queue_timeout=settings.tenant_queue_timeout,
                          refusal_hold=settings.tenant_refusal_hold, shared=shared)
        return cls(settings, store, registry, pool, metrics, limiter, JobStore(store),
                   build_cache_salts(settings), supervisor, worker)

    def children(self) -> list[ChildSupervisor]:
        return [c for c in (self.supervisor, self.worker) if c is not None]

    def prepare_base_stand_in(self) -> None:
        """Route base-model requests through the all-zero adapter (see `adapters.zero`)."""
        if not self.settings.base_through_zero_adapter:
            return
        try:
            folder = ensure_zero_adapter(self.registry.root / ZERO_FOLDER, self.registry.base)
        except Exception as exc:  # the base model is unreadable: uploads fail too, and say why
            log.error("no zero adapter for base-model requests: %s", exc)
            return
        self.pool.base_stand_in = (ZERO_ENGINE_NAME, str(folder))

class _MetricsObserver(PoolObserver):
    def __init__(self, metrics: Metrics, store: Store):
        self.metrics = metrics
        self.store = store

    async def verdict(self, engine_model: str, loaded: bool) -> None:
        from server.publishing.lifecycle import engine_verdict  # lifecycle needs Services: imported when first used

        await engine_verdict(self.store, engine_model, loaded)

    def loaded(self, engine: str, seconds: float) -> None:
        self.metrics.adapter_loaded(engine, seconds)

    def unloaded(self, engine: str) -> None:
        self.metrics.adapter_unloaded(engine)


def build_cache_salts(settings: Settings) -> CacheSalts:
    if settings.cache_salt_secret is not None:
        return CacheSalts(settings.cache_salt_secret.get_secret_value().encode())
    return CacheSalts(load_or_create_secret(settings.data_dir / "cache-salt.secret"))
