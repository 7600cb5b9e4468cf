"""`lorax-mlflow`: command-line entry point (`lorax-mlflow serve`)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "LORAX_ADMIN_TOKEN"

# flag -> EngineConfig field; each is also read from LORAX_<FIELD> by EngineConfig.with_env_overrides.
ENGINE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "token budget of one engine step"),
    "--prefill-chunk-tokens": ("prefill_chunk_tokens", int,
                               "prefill tokens per step while others decode (default: learned from step times)"),
    "--max-num-seqs": ("max_num_seqs", int, "most sequences decoding at once"),
    "--kv-cache-bytes": ("kv_cache_bytes", int, "KV cache budget in bytes"),
    "--max-loras": ("max_loras", int, "adapters resident on the device at once"),
    "--max-lora-rank": ("max_lora_rank", int, "largest adapter rank accepted"),
    "--max-model-len": ("max_model_len", int, "context window in tokens"),
    "--dtype": ("dtype", str, "auto, float32, bfloat16 or float16"),
    "--device": ("device", str, "auto, cpu, cuda or cuda:N"),
    "--num-threads": ("num_threads", int,
                      "torch threads of the engine thread (default: 1 on a CPU with <= 4 cores, else torch's)"),
    "--max-adapter-bytes": ("max_adapter_bytes", int, "largest adapter one download (S3, MLflow) may fetch, in bytes"),
    "--verified-token-ttl-s": ("verified_token_ttl_s", float,
                               "seconds a token the hub accepted for a private adapter is trusted"),
    "--max-prompts-per-request": ("max_prompts_per_request", int, "most prompts in one completions request"),
    "--max-sequences-per-request": ("max_sequences_per_request", int,
                                    "most sequences one request may start (prompts x n / best_of)"),
}


def env_name(field: str) -> str:
    return f"LORAX_{field.upper()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorax-mlflow", description="Multi-LoRA LLM serving packaged as an MLflow model.")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve",
        help="serve an MLflow model over OpenAI-compatible, LoRAX and MLflow routes",
        description="Load an MLflow lorax-mlflow model in this process and serve /v1/chat/completions, "
        "/v1/completions, /v1/models, /generate, /generate_stream, /invocations, /health and /metrics. "
        "Engine flags override the model's engine config and their LORAX_* environment variables.",
    )
    serve.add_argument("-m", "--model-uri", help="any MLflow model URI (path, runs:/, models:/name@alias); "
                       "default: the embedded SmolLM2-135M-Instruct with the demo adapters")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    for flag, (field, kind, text) in ENGINE_FLAGS.items():
        serve.add_argument(flag, type=kind, dest=field, help=f"{text} (env {env_name(field)})")
    serve.add_argument("--adapter-root", action="append", dest="adapter_roots", metavar="DIR",
                       help=f"folder that requests may name local adapters from; repeatable "
                       f"(env {env_name('adapter_roots')}, {os.pathsep}-separated)")
    serve.add_argument("--preload-adapter", action="append", dest="preload_adapters", default=[],
                       metavar="NAME=ID", help="load adapter ID (any source) as NAME before /health is ready; "
                       "repeatable")
    serve.add_argument("--enable-adapter-management", action="store_true",
                       help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, protected by the "
                       f"admin token in ${ADMIN_TOKEN_ENV} (required)")
    serve.add_argument("--replicas", type=int, default=0, metavar="N",
                       help="serve with N engine replicas (one core each) on a local Ray cluster, requests "
                       "routed by adapter id (needs the ray extra: pip install lorax-mlflow[ray])")
    serve.add_argument("--s3-allow", action="append", dest="s3_allow", metavar="S3_URI",
                       help="s3://bucket/prefix that S3 adapter ids may lie under; repeatable "
                       f"(env {env_name('s3_allow')}, comma-separated). Default: none, S3 adapters are off")
    serve.add_argument("--trust-request-chat-template", action="store_true", default=None,
                       dest="trust_request_chat_template",
                       help="accept a per-request chat_template (rendered sandboxed, with time and size budgets) "
                       f"(env {env_name('trust_request_chat_template')}=1)")
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


def apply_engine_flags(args: argparse.Namespace) -> None:
    """Write the given flags to their LORAX_* variables, so that flags > environment > model config."""
    for field, _kind, _text in ENGINE_FLAGS.values():
        value = getattr(args, field)
        if value is not None:
            os.environ[env_name(field)] = str(value)
    if args.adapter_roots:
        os.environ[env_name("adapter_roots")] = os.pathsep.join(str(Path(r).resolve()) for r in args.adapter_roots)
    if args.s3_allow:
        os.environ[env_name("s3_allow")] = ",".join(args.s3_allow)
    if args.trust_request_chat_template:
        os.environ[env_name("trust_request_chat_template")] = "1"
    if args.max_request_bytes is not None:
        os.environ["LORAX_MAX_REQUEST_BYTES"] = str(args.max_request_bytes)


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

    from lorax_mlflow.server import create_app, load_served_model
    from lorax_mlflow.server.adapter_admin import preload_adapters

    apply_engine_flags(args)
    model_uri = args.model_uri
    preloads = parse_preloads(args.preload_adapters)
    token = admin_token(args)
    if args.replicas:
        return serve_replicas(args, preloads)

    def load():
        served = load_served_model(model_uri or str(default_model_path()))
        preload_adapters(served.service, preloads)
        return served

    app = create_app(load, admin_token=token)
    logger.info("serving %s on http://%s:%d", model_uri or "the embedded default model", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def serve_replicas(args: argparse.Namespace, preloads: dict[str, str]) -> int:
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
