"""What the server serves: the LoraxService (and its ChatModel), loaded in the background at startup."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorax_mlflow.errors import EngineUnavailableError
from lorax_mlflow.service import LoraxService

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    service: LoraxService
    predict: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """The loaded pyfunc model's predict: answers /invocations exactly as `mlflow models serve` does
    (schema enforcement included). None when serving a bare LoraxService."""


def load_served_model(model_uri: str, model_config: dict[str, Any] | None = None,
                      engine_overrides: dict[str, Any] | None = None) -> ServedModel:
    """Load an MLflow LoraxChatModel in this process (local path, runs:/, models:/name@alias, ...);
    `engine_overrides` replace EngineConfig fields of the model's config (the serve flags)."""
    import mlflow

    from lorax_mlflow.chat_model import unwrap_chat_model
    from lorax_mlflow.loading import engine_overrides as overriding

    with overriding(**(engine_overrides or {})):
        pyfunc_model = mlflow.pyfunc.load_model(model_uri, model_config=model_config)
    return ServedModel(unwrap_chat_model(pyfunc_model).service, pyfunc_model.predict)


ModelSource = LoraxService | ServedModel | Callable[[], ServedModel]


class ModelHolder:
    """Holds the served model; until a loader thread has produced it, every use raises a 503."""

    def __init__(self, source: ModelSource) -> None:
        self._model: ServedModel | None = None
        self._loader: Callable[[], ServedModel] | None = None
        self._thread: threading.Thread | None = None
        self.load_error: BaseException | None = None
        if isinstance(source, LoraxService):
            self._model = ServedModel(source)
        elif isinstance(source, ServedModel):
            self._model = source
        else:
            self._loader = source

    def start_loading(self) -> None:
        if self._loader is not None and self._thread is None:
            self._thread = threading.Thread(target=self._load, name="lorax-model-load", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        assert self._loader is not None
        try:
            self._model = self._loader()
            logger.info("model loaded: serving base %s", self._model.service.base_model_name)
        except BaseException as error:  # reported by /health and every route
            logger.exception("model failed to load")
            self.load_error = error

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> ServedModel:
        if self._model is None:
            if self.load_error is not None:
                raise EngineUnavailableError(f"the model failed to load: {self.load_error}")
            raise EngineUnavailableError("the model is still loading; retry when /health answers 200")
        return self._model

    @property
    def service(self) -> LoraxService:
        return self.model.service
