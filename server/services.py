"""The long-lived parts of a running gateway, built once from Settings and shared by all requests."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.registry import Registry
from adapters.validate import BaseModelSpec
from server.config import Settings
from server.engine.client import EngineClient
from server.engine.pool import EnginePool
from server.engine.supervisor import EngineSupervisor
from server.store import Store


@dataclass
class Services:
    settings: Settings
    store: Store
    registry: Registry
    pool: EnginePool
    supervisor: EngineSupervisor | None = None
    draining: bool = False

    @classmethod
    def build(cls, settings: Settings) -> Services:
        store = build_store(settings)
        registry = build_registry(settings, store)
        clients = [EngineClient(url, read_timeout=settings.engine_read_timeout) for url in settings.engine_base_urls()]
        pool = EnginePool(clients)
        supervisor = None
        if settings.embedded_engine:
            supervisor = EngineSupervisor(settings, is_ready=pool.healthy, on_restart=pool.forget_all)
        return cls(settings, store, registry, pool, supervisor)


def build_store(settings: Settings) -> Store:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    store.create_schema()
    return store


def build_registry(settings: Settings, store: Store) -> Registry:
    spec = BaseModelSpec(
        model_id=settings.base_model_id, served_name=settings.served_model_name,
        path=settings.model_path, max_rank=settings.engine_max_lora_rank,
    )
    return Registry(settings.registry_path, store, spec)
