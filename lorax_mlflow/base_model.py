"""Where the base model's weights come from: the embedded default, a local folder, or the HF hub cache."""

from __future__ import annotations

import logging
from pathlib import Path

from lorax_mlflow.default_model import DEFAULT_MODEL_NAME, default_model_path

logger = logging.getLogger(__name__)


class BaseModelError(RuntimeError):
    """The base model cannot be found or used (raised at load time, never at the first request)."""


def base_model_name(reference: str | None) -> str:
    if reference is None:
        return DEFAULT_MODEL_NAME
    return reference.split("@", 1)[0] if not Path(reference).exists() else Path(reference).name


def resolve_base_model(reference: str | None) -> Path:
    """A local folder with config.json and weights for `reference` (None = the embedded default)."""
    if reference is None or reference == DEFAULT_MODEL_NAME:
        return default_model_path()
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise BaseModelError(f"base model folder {path} has no config.json")
        return path
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise BaseModelError(f"base model {reference!r} is neither an existing folder nor a hub id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = reference.partition("@")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise BaseModelError(f"base model {reference!r} is not in the Hugging Face cache and cannot be fetched: {error}") from error
    logger.info("base model %s from the hub cache at %s", reference, folder)
    return Path(folder)
