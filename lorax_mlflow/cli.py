"""`lorax-mlflow`: command-line entry point (`lorax-mlflow serve`)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorax_mlflow.engine.config import engine_settings

logger = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "LORAX_ADMIN_TOKEN"


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, from its declaration (type, default, help, LORAX_* variable)."""
    group = parser.add_argument_group(
        "engine", "override the model's engine config; each flag is also an environment variable (flag > "
        "environment > model config)")
    for spec in engine_settings():
        text = f"{spec.help} (env {spec.env_var}".replace("%", "%%")
        if spec.separator is not None:
            group.add_argument(spec.flag, dest=spec.name, action="append", type=spec.parse, metavar="VALUE",
                               help=f"{text}, {spec.separator!r}-separated)")
        elif spec.kind is bool or isinstance(spec.default, bool):
            group.add_argument(spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text})")
        else:
            default = "" if spec.default is None else f"; default {spec.default}"
            group.add_argument(spec.flag, dest=spec.name, type=spec.kind, help=f"{text}{default})")


def engine_flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags given on the command line, as EngineConfig fields."""
    values = {}
    for spec in engine_settings():
        value = getattr(args, spec.name)
        if value is not None:
            values[spec.name] = [item for given in value for item in given] if spec.separator is not None else value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorax-mlflow", description="Multi-LoRA LLM serving packaged as an MLflow model.")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve",
        help="serve an MLflow model over OpenAI-compatible, LoRAX and MLflow routes",
        description="Load an MLflow lorax-mlflow model and serve /v1/chat/completions, /v1/completions, "
        "/v1/models, /generate, /generate_stream, /invocations, /health and /metrics. The engine core "
        "runs in its own process.",
    )
    serve.add_argument("-m", "--model-uri", help="any MLflow model URI (path, runs:/, models:/name@alias); "
                       "default: the embedded SmolLM2-135M-Instruct with the demo adapters")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_flags(serve)
    serve.add_argument("--preload-adapter", action="append", dest="preload_adapters", default=[],
                       metavar="NAME=ID", help="load adapter ID (any source) as NAME before /health is ready; "
                       "repeatable")
    serve.add_argument("--enable-adapter-management", action="store_true",
                       help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, protected by the "
                       f"admin token in ${ADMIN_TOKEN_ENV} (required)")
    serve.add_argument("--replicas", type=int, default=0, metavar="N",
                       help="serve with N engine replicas (one core each) on a local Ray cluster, requests "
                       "routed by adapter id (needs the ray extra: pip install lorax-mlflow[ray])")
    serve.add_argument("--max-request-bytes", type=int, default=None,
                       help="largest request body accepted; larger ones get 413 before they are parsed "
                       "(env LORAX_MAX_REQUEST_BYTES; default 4 MiB)")
    return parser


def parse_preloads(specs: Sequence[str]) -> dict[str, str]:
    preloads = {}
    for spec in specs:
        name, sep, adapter_id = spec.partition("=")
        if not sep or not name or not adapter_id:
            raise SystemExit(f"--preload-adapter takes NAME=ID, got {spec!r}")
        preloads[name] = adapter_id
    return preloads


def admin_token(args: argparse.Namespace) -> str | None:
    """The admin token when adapter management is enabled; it is read from the environment only,
    so it never shows in a process listing."""
    if not args.enable_adapter_management:
        return None
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        raise SystemExit(f"--enable-adapter-management needs an admin token in ${ADMIN_TOKEN_ENV}")
    return token


def default_model_path() -> Path:
    """The embedded default model with the demo adapters, saved once as an MLflow model in the cache."""
    from filelock import FileLock

    import lorax_mlflow
    from lorax_mlflow.default_model import cache_root
    from lorax_mlflow.demo_adapters import ensure_demo_adapters
    from lorax_mlflow.demo_medusa import ensure_demo_medusa

    target = cache_root() / "default-model-2"  # 2: with the demo Medusa adapter
    if (target / "MLmodel").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "MLmodel").exists():
            adapters = ensure_demo_adapters() | ensure_demo_medusa()
            staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
            logger.info("saving the default model with adapters %s to %s", sorted(adapters), target)
            lorax_mlflow.save_model(staging, adapters=adapters)
            staging.rename(target)
    return target


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lorax_mlflow.redact import uvicorn_log_config
    from lorax_mlflow.server import create_app, load_served_model
    from lorax_mlflow.server.adapter_admin import preload_adapters

    model_uri = args.model_uri
    preloads = parse_preloads(args.preload_adapters)
    token = admin_token(args)
    overrides = engine_flag_values(args)
    if args.replicas:
        return serve_replicas(args, preloads, overrides)

    def load():
        served = load_served_model(model_uri or str(default_model_path()), engine_overrides=overrides)
        preload_adapters(served.service, preloads)
        return served

    app = create_app(load, admin_token=token, max_request_bytes=args.max_request_bytes)
    logger.info("serving %s on http://%s:%d", model_uri or "the embedded default model", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, log_config=uvicorn_log_config())
    return 0


def serve_replicas(args: argparse.Namespace, preloads: dict[str, str], overrides: dict[str, Any]) -> int:
    """`serve --replicas N`: the Ray Serve application on a local Ray cluster."""
    if args.enable_adapter_management:
        raise SystemExit("--enable-adapter-management is not available with --replicas (names would differ "
                         "between replicas); use --preload-adapter")
    try:
        from lorax_mlflow.ray import run_local
    except ImportError as error:
        raise SystemExit(f"--replicas needs Ray Serve: pip install 'lorax-mlflow[ray]' ({error})") from error
    engine_env = {name: value for name, value in os.environ.items()
                  if name.startswith("LORAX_") and name != ADMIN_TOKEN_ENV}
    engine_env.update({spec.env_var: spec.to_env(overrides[spec.name]) for spec in engine_settings()
                       if spec.name in overrides})  # the flags win, in every replica
    if args.max_request_bytes is not None:
        engine_env["LORAX_MAX_REQUEST_BYTES"] = str(args.max_request_bytes)
    run_local(args.model_uri, replicas=args.replicas, host=args.host, port=args.port, engine_env=engine_env,
              preload_adapters=preloads)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lorax_mlflow.redact import install_log_redaction

    install_log_redaction()
    return serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
