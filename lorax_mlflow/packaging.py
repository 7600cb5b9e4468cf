"""save_model / log_model: package a base-model reference, named adapters and the engine config."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import mlflow.models.model as mlflow_model_module
from mlflow.models import Model
from mlflow.models.model import ModelInfo
from packaging.version import Version

import lorax_kernels
import lorax_mlflow
from lorax_mlflow.adapters.medusa_format import read_medusa_config
from lorax_mlflow import __version__
from lorax_mlflow.base_model import resolve_base_model
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.loading import ADAPTER_ARTIFACT_PREFIX, BASE_WEIGHTS_ARTIFACT

logger = logging.getLogger(__name__)

_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "gguf", "mlflow",
                 "fastapi", "uvicorn", "prometheus_client", "xgrammar", "boto3", "tqdm", "jsonschema", "peft", "pyzmq", "msgspec", "regex")


def pip_requirements() -> list[str]:
    """The model's runtime requirements, pinned to what is installed here.

    Pins carry the public version only: a local label such as torch's ``+cpu`` names a wheel that
    only its own package index has, so ``torch==2.13.0+cpu`` would not install from PyPI.
    """
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={Version(metadata.version(name)).public}")
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
        if not Path(path, "adapter_config.json").exists() and read_medusa_config(Path(path), name) is None:
            raise FileNotFoundError(
                f"adapter {name!r}: {path} is not a PEFT adapter folder (no adapter_config.json) "
                "or a Medusa adapter (no config.json with medusa_num_heads)"
            )
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


@contextlib.contextmanager
def _stopping_the_validation_engine() -> Iterator[None]:
    """Stop the engine that MLflow starts while saving a ChatModel.

    Saving a ChatModel loads the code model (``model_code.py`` -> ``mlflow.models.set_model``) and
    runs ``load_context`` + ``predict`` on an input example. That engine would otherwise keep its
    thread and the base weights alive after logging. Only a model set during this block is stopped.
    That engine runs in-process: one predict does not pay for starting a core process.
    """
    from lorax_mlflow.loading import engines_in_process

    before = mlflow_model_module.__mlflow_model__
    try:
        with engines_in_process():
            yield
    finally:
        from lorax_mlflow.chat_model import LoraxChatModel

        validated = mlflow_model_module.__mlflow_model__
        if validated is not before and isinstance(validated, LoraxChatModel) and validated.service is not None:
            validated.service.engine.shutdown()
            validated.service = None


def _save_pyfunc_without_serving_check(path: str, mlflow_model: Model, validate_serving_input: bool = False,
                                       **kwargs: Any) -> None:
    mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)


# `Model.log` reloads a logged model to check its serving input unless the flavor is told not to
# (MLflow's transformers flavor does the same). ChatModel saving has already loaded the model and
# predicted on the input example, so that check would only load the base weights a second time.
_PYFUNC_WITHOUT_SERVING_CHECK = SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc_without_serving_check)


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
    with tempfile.TemporaryDirectory() as staging, _stopping_the_validation_engine():
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
    """Log (and optionally register) a LoraxChatModel to the active MLflow run.

    The base model is loaded once, by MLflow's ChatModel input-example check, and stopped afterwards.
    """
    with tempfile.TemporaryDirectory() as staging, _stopping_the_validation_engine():
        kwargs = _save_kwargs(base_model, adapters, adapter_roots, engine_config, embed_base_weights, Path(staging))
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=_PYFUNC_WITHOUT_SERVING_CHECK,
            flavor_name="pyfunc.ModelFromCode",
            registered_model_name=registered_model_name,
            validate_serving_input=False,
            **kwargs,
            **mlflow_kwargs,
        )
