"""Log a LoraxChatModel, register it and point an alias at the new version, in one call."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from lorax_mlflow.packaging import log_model

logger = logging.getLogger(__name__)

DEMO = "demo"


def adapters_from_spec(spec: str) -> dict[str, Path]:
    """Name -> PEFT folder from a command-line spec.

    ``""``: no adapters. ``"demo"``: the demo adapters (trained on first use). A folder whose
    sub-folders are PEFT adapters: each under its folder name. ``"name=folder,name=folder"``: those.
    """
    spec = spec.strip()
    if not spec:
        return {}
    if spec == DEMO:
        from lorax_mlflow.demo_adapters import ensure_demo_adapters

        return ensure_demo_adapters()
    if "=" in spec:
        pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
        return {name.strip(): Path(folder.strip()).expanduser() for name, folder in pairs}
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise ValueError(f"adapters {spec!r}: expected '', 'demo', a folder of PEFT adapters, or name=folder pairs")
    found = {child.name: child for child in sorted(root.iterdir()) if (child / "adapter_config.json").exists()}
    if not found:
        raise ValueError(f"adapters folder {root} has no PEFT adapter sub-folders (with adapter_config.json)")
    return found


def log_and_register(
    registered_model_name: str,
    *,
    alias: str | None = None,
    base_model: str | None = None,
    adapters: dict[str, str | Path] | None = None,
    name: str = "model",
    **log_kwargs: Any,
) -> ModelVersion:
    """Log the model to the active run, register it, and set ``alias`` on the new version."""
    info = log_model(name=name, registered_model_name=registered_model_name, base_model=base_model,
                     adapters=adapters, **log_kwargs)
    client = MlflowClient()
    version = str(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(registered_model_name, alias, version)
    logger.info("registered %s version %s%s (adapters: %s)", registered_model_name, version,
                f" as @{alias}" if alias else "", ", ".join(sorted(adapters or {})) or "none")
    return client.get_model_version(registered_model_name, version)
