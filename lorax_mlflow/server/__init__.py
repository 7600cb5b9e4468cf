"""HTTP server: OpenAI-compatible, LoRAX-native and MLflow routes over a LoraxService."""

from lorax_mlflow.server.app import create_app
from lorax_mlflow.server.model_source import ServedModel, load_served_model

__all__ = ["ServedModel", "create_app", "load_served_model"]
