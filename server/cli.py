"""The `loraserve` command.

    loraserve up                     prepare the model, first-run set-up, then gateway + engine
    loraserve gateway                the gateway alone (embedded engine unless engine URLs are set)
    loraserve model prepare          prepare the default base model into the data folder
    loraserve tenant create NAME     add a tenant            loraserve tenant list
    loraserve key create --tenant T  make a tenant key (or --admin); the secret is printed once
    loraserve adapter publish DIR --tenant T --name N      validate and publish an adapter folder

Settings come from LORASERVE_* environment variables (see the README).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from adapters.basemodel import BaseModelError, ensure_default_model, is_model_folder
from adapters.names import InvalidName
from adapters.validate import AdapterInvalid
from server.config import Settings
from server.services import build_registry, build_store
from server.store import Store


class CommandError(Exception):
    """A message for the operator; the command exits with status 1."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings()
    try:
        return args.run(settings, args) or 0
    except (CommandError, BaseModelError, AdapterInvalid, InvalidName, LookupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-tenant LoRA inference server.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    sub.add_parser("up", help="prepare, set up on first run, and serve").set_defaults(run=cmd_up)
    sub.add_parser("gateway", help="serve the gateway (and its embedded engine)").set_defaults(run=cmd_gateway)

    model = sub.add_parser("model", help="the base model").add_subparsers(required=True, metavar="ACTION")
    model.add_parser("prepare", help="prepare the default base model").set_defaults(run=cmd_model_prepare)

    tenant = sub.add_parser("tenant", help="tenants").add_subparsers(required=True, metavar="ACTION")
    create = tenant.add_parser("create", help="add a tenant")
    create.add_argument("name")
    create.set_defaults(run=cmd_tenant_create)
    tenant.add_parser("list", help="list tenants").set_defaults(run=cmd_tenant_list)

    key = sub.add_parser("key", help="API keys").add_subparsers(required=True, metavar="ACTION")
    kcreate = key.add_parser("create", help="make a key; its secret is printed once")
    who = kcreate.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant")
    who.add_argument("--admin", action="store_true")
    kcreate.set_defaults(run=cmd_key_create)

    adapter = sub.add_parser("adapter", help="adapters").add_subparsers(required=True, metavar="ACTION")
    publish = adapter.add_parser("publish", help="validate and publish an adapter folder")
    publish.add_argument("folder", type=Path)
    publish.add_argument("--tenant", required=True)
    publish.add_argument("--name", required=True)
    publish.set_defaults(run=cmd_adapter_publish)
    return parser


def cmd_up(settings: Settings, _args) -> None:
    prepare_model(settings)
    store = build_store(settings)
    first_run_setup(settings, store)
    serve(settings)


def cmd_gateway(settings: Settings, _args) -> None:
    if not is_model_folder(settings.model_path) and settings.embedded_engine:
        raise CommandError(f"No model at {settings.model_path}; run `loraserve model prepare` first.")
    serve(settings)


def cmd_model_prepare(settings: Settings, _args) -> None:
    print(f"Base model ready at {prepare_model(settings)}")


def cmd_tenant_create(settings: Settings, args) -> None:
    tenant = build_store(settings).create_tenant(args.name)
    print(f"Created tenant '{tenant.id}'. Make it a key: loraserve key create --tenant {tenant.id}")


def cmd_tenant_list(settings: Settings, _args) -> None:
    for tenant in build_store(settings).list_tenants():
        print(tenant.id)


def cmd_key_create(settings: Settings, args) -> None:
    key_id, secret = build_store(settings).create_key(None if args.admin else args.tenant)
    owner = "admin" if args.admin else f"tenant '{args.tenant}'"
    print(f"Key {key_id} for {owner} (shown once, store it now):\n{secret}")


def cmd_adapter_publish(settings: Settings, args) -> None:
    if not args.folder.is_dir():
        raise CommandError(f"{args.folder} is not a folder")
    store = build_store(settings)
    registry = build_registry(settings, store)
    registry.root.mkdir(parents=True, exist_ok=True)
    published = registry.publish(args.folder, args.tenant, args.name, origin="cli")
    print(f"Published {args.tenant}/{args.name} version {published.version}; call it with model='{args.name}'.")


def prepare_model(settings: Settings) -> Path:
    if settings.uses_default_model:
        return ensure_default_model(settings.model_path)
    if not is_model_folder(settings.model_path):
        raise CommandError(
            f"LORASERVE_BASE_MODEL_PATH={settings.model_path} is not a Hugging Face model folder "
            "(config.json and *.safetensors)."
        )
    return settings.model_path


def first_run_setup(settings: Settings, store: Store) -> None:
    """On an empty database: a `demo` tenant with a key; an admin key unless one is configured."""
    if not store.list_tenants():
        store.create_tenant("demo")
        _, secret = store.create_key("demo")
        print(f"Created tenant 'demo'. Its API key (shown once, store it now):\n  {secret}")
    if settings.admin_key is None and not store.has_admin_key():
        _, secret = store.create_key(None)
        print(f"Created an admin key (shown once; or set LORASERVE_ADMIN_KEY):\n  {secret}")


def serve(settings: Settings) -> None:
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call is noise
    print(f"Gateway on http://{settings.host}:{settings.port} (ready when /readyz says so; "
          f"the engine's first start takes about a minute, log: {settings.log_dir / 'engine.log'})", flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    sys.exit(main())
