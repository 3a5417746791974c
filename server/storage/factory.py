"""The database and the adapter registry, opened from Settings (by the gateway, the worker and the CLI)."""

from __future__ import annotations

from adapters.registry import AdapterQuota, Registry
from adapters.validate import BaseModelSpec
from server.config import Settings
from server.storage.store import Store


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
    quota = AdapterQuota(settings.tenant_max_adapters, settings.tenant_max_adapter_bytes)
    return Registry(settings.registry_path, store, spec, quota)
