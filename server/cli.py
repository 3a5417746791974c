"""The `loraserve` command.

    loraserve up                     prepare the model, first-run set-up, then gateway + engine
    loraserve gateway                the gateway alone (embedded engine unless engine URLs are set)
    loraserve engine [--listen ADDR] the vLLM engine alone, with the gateway's flags (containers, k8s)
    loraserve model prepare          prepare the default base model into the data folder
    loraserve db upgrade             migrate the database to the newest schema (gateways also do on start)
    loraserve tenant create NAME     add a tenant            loraserve tenant list
    loraserve key create --tenant T  make a tenant key (or --admin); the secret is printed once
    loraserve adapter publish DIR --tenant T --name N      validate and publish an adapter folder
    loraserve worker                 run queued fine-tuning jobs
    loraserve train --tenant T --name N --data FILE        train an adapter here and publish it

Settings come from LORASERVE_* environment variables (see the README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapters.basemodel import BaseModelError, ensure_default_model, is_model_folder
from adapters.names import InvalidName, check_name
from adapters.validate import AdapterInvalid
from server.config import Settings
from server.observability.logs import configure_logging
from server.storage.factory import build_registry, build_store
from server.storage.store import Store


class TrainingRefused(Exception):
    """The trained adapter was not better than the base model (--require-improvement)."""


class CommandError(Exception):
    """A message for the operator; the command exits with status 1."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm"]:  # vLLM's own command line, passed through whole (its flags are not ours)
        from server.engine.vllm_cli import run_vllm_cli

        return run_vllm_cli(argv[1:])
    args = _parser().parse_args(argv)
    settings = Settings()
    try:
        return args.run(settings, args) or 0
    except (CommandError, BaseModelError, AdapterInvalid, InvalidName, LookupError, ValueError, TrainingRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-tenant LoRA inference server.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    sub.add_parser("up", help="prepare, set up on first run, and serve").set_defaults(run=cmd_up)
    sub.add_parser("gateway", help="serve the gateway (and its embedded engine)").set_defaults(run=cmd_gateway)

    engine = sub.add_parser("engine", help="run the vLLM engine alone, with the flags the gateway would give it")
    engine.add_argument(
        "--listen", metavar="ADDRESS",
        help="address to bind instead of LORASERVE_ENGINE_HOST, e.g. 0.0.0.0 inside a container or pod "
        "whose network only the gateway reaches (the engine must never face tenants)",
    )
    engine.set_defaults(run=cmd_engine)

    model = sub.add_parser("model", help="the base model").add_subparsers(required=True, metavar="ACTION")
    model.add_parser("prepare", help="prepare the default base model").set_defaults(run=cmd_model_prepare)

    db = sub.add_parser("db", help="the database").add_subparsers(required=True, metavar="ACTION")
    db.add_parser("upgrade", help="migrate the database to the newest schema").set_defaults(run=cmd_db_upgrade)

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

    sub.add_parser("vllm", help="vLLM's own command line, e.g. `loraserve vllm bench serve ...`", add_help=False)
    sub.add_parser("worker", help="run queued fine-tuning jobs").set_defaults(run=cmd_worker)
    train = sub.add_parser("train", help="train an adapter on a chat (or, with --method dpo, preference) JSONL file "
                                         "and publish it")
    train.add_argument("--tenant", required=True)
    train.add_argument("--name", required=True)
    train.add_argument("--data", required=True, type=Path, help="training conversations or pairs (JSONL)")
    train.add_argument("--validation", type=Path, help="validation conversations or pairs (JSONL)")
    train.add_argument("--method", choices=("supervised", "dpo"), default="supervised")
    train.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=float, default=16)
    train.add_argument("--require-improvement", action="store_true")
    train.set_defaults(run=cmd_train)
    return parser


def cmd_up(settings: Settings, _args) -> None:
    prepare_model(settings)
    store = build_store(settings)
    first_run_setup(settings, store)
    serve(settings.model_copy(update={"run_worker": True}))


def cmd_gateway(settings: Settings, _args) -> None:
    if not is_model_folder(settings.model_path) and settings.embedded_engine:
        raise CommandError(f"No model at {settings.model_path}; run `loraserve model prepare` first.")
    serve(settings)


def cmd_engine(settings: Settings, args) -> None:
    """Replace this process with vLLM's OpenAI server (so signals and exit status are the engine's own)."""
    import os

    from server.engine.supervisor import engine_command, engine_env

    prepare_model(settings)
    command = engine_command(settings)
    if args.listen:
        command[command.index("--host") + 1] = args.listen
    print("Starting the engine:", " ".join(command), flush=True)
    os.execvpe(command[0], command, engine_env(settings))


def cmd_model_prepare(settings: Settings, _args) -> None:
    print(f"Base model ready at {prepare_model(settings)}")


def cmd_db_upgrade(settings: Settings, _args) -> None:
    """Alembic's upgrade to the newest revision, under the same lock gateways take when they start."""
    from server.storage.connection import database_url
    from server.storage.migrations import head

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    revision = Store(settings.db_url).create_schema()
    where = database_url(settings.db_url).render_as_string(hide_password=True)
    print(f"Database {where} is at schema revision {revision} (newest: {head()}).")


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


def cmd_worker(settings: Settings, _args) -> None:
    from server.finetuning.worker import Worker

    configure_logging(settings.log_level, settings.log_format)
    prepare_model(settings)
    Worker(settings).run()


def cmd_train(settings: Settings, args) -> None:
    """The bundled job, run here with a progress bar, then published like an upload."""
    import tempfile

    from tqdm import tqdm

    from adapters.train.job import NoImprovement, TrainConfig, run

    check_name(args.name, "adapter")
    store = build_store(settings)
    store.require_tenant(args.tenant)
    registry = build_registry(settings, store)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            base_model=prepare_model(settings), train_file=args.data, validation_file=args.validation,
            output_dir=Path(tmp) / "adapter", epochs=args.epochs, learning_rate=args.learning_rate,
            batch_size=args.batch_size, rank=args.rank, alpha=args.alpha,
            require_improvement=args.require_improvement, method=args.method, beta=args.beta,
        )
        bar = tqdm(unit="step", desc="training")

        def report(event: dict) -> None:
            data = event.get("data") or {}
            if event.get("type") == "step":
                bar.total = data.get("total_steps")
                bar.set_postfix(loss=f"{data.get('loss', 0):.4f}")
                bar.update(1)
            elif event.get("message"):
                bar.write(event["message"])

        try:
            result = run(config, report)
        except NoImprovement as exc:
            raise TrainingRefused(str(exc)) from exc
        finally:
            bar.close()
        published = registry.publish(config.output_dir, args.tenant, args.name, origin="cli-train")
    print(_summary(result))
    print(f"Published {args.tenant}/{args.name} version {published.version}; call it with model='{args.name}'.")


def _summary(result: dict) -> str:
    """The trained adapter against what it started from, in one line."""
    general = result["general"]
    forgetting = f"general set loss {general['base_loss']:.4f} -> {general['adapter_loss']:.4f}"
    if result.get("method") == "dpo":
        pairs = result["preferences"]
        return (f"Preference accuracy ({pairs['split']}): {pairs['before']['preference_accuracy']:.0%} -> "
                f"{pairs['after']['preference_accuracy']:.0%}, log-probability margin "
                f"{pairs['before']['logprob_margin']:+.3f} -> {pairs['after']['logprob_margin']:+.3f}; {forgetting}")
    validation = result["validation"]
    return (f"Validation loss ({validation['split']}): base {validation['base_loss']:.4f} -> adapter "
            f"{validation['adapter_loss']:.4f}; {forgetting}")


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

    from server.api.app import create_app

    configure_logging(settings.log_level, settings.log_format)
    print(f"Gateway on http://{settings.host}:{settings.port} (ready when /readyz says so; "
          f"the engine's first start takes about a minute, log: {settings.log_dir / 'engine.log'})", flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None, timeout_graceful_shutdown=30)


if __name__ == "__main__":
    sys.exit(main())
