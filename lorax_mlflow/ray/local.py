"""A local Ray cluster for `lorax-mlflow serve --replicas N` (and the tests)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lorax_mlflow
from lorax_mlflow.ray.deployments import build_app

logger = logging.getLogger(__name__)

APP_NAME = "lorax-mlflow"


def start_local_cluster(num_cpus: float | None = None, object_store_bytes: int = 256 << 20) -> None:
    """Start Ray in this process with workers that import this very copy of lorax_mlflow.

    The workers get the package's parent folder on PYTHONPATH, so a source checkout works like
    an installed package.
    """
    import ray

    source_root = str(Path(lorax_mlflow.__file__).resolve().parent.parent)
    python_path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes,
        runtime_env={"env_vars": {"PYTHONPATH": python_path}}, logging_level=logging.WARNING,
        log_to_driver=False,
    )


def run_local(
    model_uri: str | None,
    *,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8080,
    engine_env: dict[str, str] | None = None,
    preload_adapters: dict[str, str] | None = None,
) -> None:
    """Serve `model_uri` with `replicas` engine replicas (one core each) on a local Ray cluster; blocks."""
    import ray
    from ray import serve

    start_local_cluster(num_cpus=max(replicas, os.cpu_count() or 1))
    try:
        serve.start(http_options={"host": host, "port": port})
        logger.info("serving %s with %d replicas on http://%s:%d", model_uri or "the embedded default model",
                    replicas, host, port)
        serve.run(build_app(model_uri, replicas=replicas, engine_env=engine_env, preload_adapters=preload_adapters),
                  name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        serve.shutdown()
        ray.shutdown()
