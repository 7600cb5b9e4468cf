"""save_model / log_model: package a base-model reference, named adapters and the engine config."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models.model import ModelInfo

import lorax_kernels
import lorax_mlflow
from lorax_mlflow import __version__
from lorax_mlflow.base_model import resolve_base_model
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.loading import ADAPTER_ARTIFACT_PREFIX, BASE_WEIGHTS_ARTIFACT

logger = logging.getLogger(__name__)

_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "gguf", "mlflow",
                 "fastapi", "uvicorn", "prometheus_client", "xgrammar", "boto3", "tqdm", "jsonschema")


def pip_requirements() -> list[str]:
    """The model's runtime requirements, pinned to what is installed here."""
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _model_config(
    base_model: str | None,
    adapters: Mapping[str, str | Path],
    adapter_roots: list[str],
    engine_config: EngineConfig | Mapping[str, Any] | None,
) -> dict[str, Any]:
    if isinstance(engine_config, EngineConfig):
        engine = engine_config.to_dict()
    else:
        engine = EngineConfig.from_dict(dict(engine_config or {})).to_dict()
    engine["adapter_roots"] = [str(Path(r).resolve()) for r in adapter_roots] or engine["adapter_roots"]
    return {
        "base_model": base_model,
        "adapters": list(adapters),
        "engine": engine,
        "lorax_mlflow_version": __version__,
    }


def _stage_code(folder: Path) -> list[str]:
    """Copy both packages under their import names so the model loads without lorax-mlflow installed."""
    paths = []
    for module in (lorax_mlflow, lorax_kernels):
        source = Path(module.__file__).parent
        target = folder / module.__name__
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        paths.append(str(target))
    return paths


def _save_kwargs(
    base_model: str | None,
    adapters: Mapping[str, str | Path] | None,
    adapter_roots: list[str | Path] | None,
    engine_config: EngineConfig | Mapping[str, Any] | None,
    embed_base_weights: bool,
    staging: Path,
) -> dict[str, Any]:
    adapters = dict(adapters or {})
    for name, path in adapters.items():
        if not Path(path, "adapter_config.json").exists():
            raise FileNotFoundError(f"adapter {name!r}: {path} is not a PEFT adapter folder (no adapter_config.json)")
    artifacts = {ADAPTER_ARTIFACT_PREFIX + name: str(Path(path).resolve()) for name, path in adapters.items()}
    if embed_base_weights:
        artifacts[BASE_WEIGHTS_ARTIFACT] = str(resolve_base_model(base_model))
    return dict(
        python_model=str(Path(lorax_mlflow.__file__).parent / "model_code.py"),
        artifacts=artifacts,
        model_config=_model_config(base_model, adapters, [str(r) for r in adapter_roots or []], engine_config),
        pip_requirements=pip_requirements(),
        code_paths=_stage_code(staging),
    )


def save_model(
    path: str | Path,
    *,
    base_model: str | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    adapter_roots: list[str | Path] | None = None,
    engine_config: EngineConfig | Mapping[str, Any] | None = None,
    embed_base_weights: bool = False,
    **mlflow_kwargs: Any,
) -> None:
    """Save a LoraxChatModel to `path`.

    ``base_model``: None (the embedded default), a local HF model folder, or a hub id (``org/name``,
    read through the huggingface_hub cache). ``adapters``: name -> PEFT folder, copied in as artifacts
    and selectable per request with ``custom_inputs.adapter_id``. ``adapter_roots``: folders from
    which requests may also name local adapters by path.
    """
    with tempfile.TemporaryDirectory() as staging:
        kwargs = _save_kwargs(base_model, adapters, adapter_roots, engine_config, embed_base_weights, Path(staging))
        mlflow.pyfunc.save_model(str(path), **kwargs, **mlflow_kwargs)


def log_model(
    name: str = "model",
    *,
    base_model: str | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    adapter_roots: list[str | Path] | None = None,
    engine_config: EngineConfig | Mapping[str, Any] | None = None,
    embed_base_weights: bool = False,
    registered_model_name: str | None = None,
    **mlflow_kwargs: Any,
) -> ModelInfo:
    """Log (and optionally register) a LoraxChatModel to the active MLflow run."""
    with tempfile.TemporaryDirectory() as staging:
        kwargs = _save_kwargs(base_model, adapters, adapter_roots, engine_config, embed_base_weights, Path(staging))
        return mlflow.pyfunc.log_model(
            name=name, registered_model_name=registered_model_name, **kwargs, **mlflow_kwargs
        )
