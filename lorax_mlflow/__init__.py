"""lorax-mlflow: many LoRA adapters of one LLM, batched together, served from MLflow."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "log_adapter", "log_model", "save_model"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import lorax_mlflow.engine` does not pay for MLflow's import.
    if name in ("save_model", "log_model"):
        from lorax_mlflow import packaging

        return getattr(packaging, name)
    if name == "log_adapter":
        from lorax_mlflow.adapter_logging import log_adapter

        return log_adapter
    raise AttributeError(name)
