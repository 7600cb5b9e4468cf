"""Models-from-code entry point: MLflow logs this file, so no pickled object is stored."""

import mlflow

from lorax_mlflow.chat_model import LoraxChatModel

mlflow.models.set_model(LoraxChatModel())
