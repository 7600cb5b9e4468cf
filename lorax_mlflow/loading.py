"""Build a running engine from an MLflow model's config and artifacts, failing loudly at load time."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from packaging.version import Version

from lorax_mlflow import __version__
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.base_model import base_model_name, resolve_base_model
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.errors import LoraxError

logger = logging.getLogger(__name__)

BASE_WEIGHTS_ARTIFACT = "base_model"
ADAPTER_ARTIFACT_PREFIX = "adapter-"


class ModelLoadError(RuntimeError):
    """The logged model cannot be served by this installation (raised by load_context)."""


_local = threading.local()


@contextlib.contextmanager
def engine_overrides(**updates: Any) -> Iterator[None]:
    """EngineConfig fields for the engines built on this thread inside the block (over the model's
    config and the LORAX_* environment): how `lorax-mlflow serve` flags reach `load_context`."""
    previous = getattr(_local, "overrides", {})
    _local.overrides = {**previous, **updates}
    try:
        yield
    finally:
        _local.overrides = previous


def engines_in_process() -> contextlib.AbstractContextManager[None]:
    """For a model loaded only to be checked once: starting a core process costs more than it serves."""
    return engine_overrides(in_process=True)


def build_engine(model_config: Mapping[str, Any], artifacts: Mapping[str, str]) -> EngineClient:
    saved_with = model_config.get("lorax_mlflow_version")
    if saved_with and Version(saved_with) > Version(__version__):
        raise ModelLoadError(
            f"this model was logged with lorax-mlflow {saved_with}, newer than the installed {__version__}: "
            "upgrade lorax-mlflow to load it"
        )
    reference = model_config.get("base_model")
    base_path = artifacts.get(BASE_WEIGHTS_ARTIFACT) or resolve_base_model(reference)
    config = EngineConfig.from_dict(dict(model_config.get("engine", {}))).with_env_overrides()
    config = config.with_overrides(getattr(_local, "overrides", {}))
    named = {
        name: artifacts[ADAPTER_ARTIFACT_PREFIX + name]
        for name in model_config.get("adapters", [])
    }
    engine = EngineClient(base_path, config, named_adapters=named, base_model_name=base_model_name(reference))
    try:
        for name in named:  # validate every packaged adapter now, not at its first request
            engine.adapters.wait_loaded(engine.adapters.resolve(AdapterRequest(name)))
    except LoraxError as error:
        engine.shutdown()
        raise ModelLoadError(f"packaged adapter failed validation: {error.message}") from error
    logger.info("engine ready: base %s, %d packaged adapters", engine.base_model_name, len(named))
    return engine
