"""LoraxChatModel: the engine behind MLflow's ChatModel interface (predict, predict_stream)."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    REQUEST_LIMIT_EXCEEDED,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
    UNAUTHENTICATED,
)
from mlflow.types.llm import ChatCompletionChunk, ChatCompletionResponse, ChatMessage, ChatParams

from lorax_mlflow import tracing
from lorax_mlflow.api.chat_request import mlflow_chat_body, mlflow_chat_request
from lorax_mlflow.api.openai_chat_format import ChatFormatter
from lorax_mlflow.errors import LoraxError
from lorax_mlflow.service import LoraxService

logger = logging.getLogger(__name__)


_MLFLOW_CODES = {401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: RESOURCE_DOES_NOT_EXIST,
                 429: REQUEST_LIMIT_EXCEEDED, 500: INTERNAL_ERROR, 503: TEMPORARILY_UNAVAILABLE}


def to_mlflow_error(error: LoraxError) -> MlflowException:
    """The MlflowException whose HTTP status is the error's own (400 for every other 4xx)."""
    return MlflowException(error.message, error_code=_MLFLOW_CODES.get(error.status, INVALID_PARAMETER_VALUE))


class LoraxChatModel(mlflow.pyfunc.ChatModel):
    """Multi-LoRA chat model. Choose the adapter per request with ``custom_inputs.adapter_id``.

    Every LoRAX/OpenAI extension that MLflow's ChatParams does not know (adapter_source,
    merged_adapters, api_token, response_format, guided_*, tool_choice, parallel_tool_calls, seed,
    min_p, logprobs, ...) travels in ``custom_inputs``. Tools come from ChatParams.tools, or from
    ``custom_inputs.tools``, which wins: MLflow's tool type keeps only part of JSON Schema
    (no minimum, maxLength, nested properties...), the OpenAI shape there keeps all of it.
    """

    def __init__(self) -> None:
        self.service: LoraxService | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from lorax_mlflow.loading import build_engine

        engine = build_engine(context.model_config or {}, context.artifacts or {})
        self.service = LoraxService(engine)

    def _service(self) -> LoraxService:
        if self.service is None:
            raise MlflowException("the model is not loaded: load_context() was not called", error_code=INTERNAL_ERROR)
        return self.service

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        service = self._service()
        body = mlflow_chat_body(messages, params)
        trace = tracing.start_request("predict", body)
        try:
            with trace.template():
                prepared = mlflow_chat_request(service, body)
            output = service.submit(prepared).result()
            response = ChatFormatter(prepared, service.engine.tokenizer, created=int(time.time())).response(output)
        except BaseException as error:
            trace.fail(error)
            if isinstance(error, LoraxError):
                raise to_mlflow_error(error) from error
            raise
        trace.finish(output, response)
        return ChatCompletionResponse.from_dict(response)

    def predict_stream(
        self, context, messages: list[ChatMessage], params: ChatParams
    ) -> Generator[ChatCompletionChunk, None, None]:
        service = self._service()
        body = mlflow_chat_body(messages, params)
        trace = tracing.start_request("predict_stream", body)
        created = int(time.time())
        try:
            with trace.template():
                prepared = mlflow_chat_request(service, body)
            formatter = ChatFormatter(prepared, service.engine.tokenizer, created=created)
            for output in service.submit(prepared):
                chunk = formatter.chunk(output)
                if chunk is not None:
                    yield ChatCompletionChunk.from_dict(chunk)
        except BaseException as error:  # GeneratorExit too: the caller stopped reading
            trace.fail(error)
            if isinstance(error, LoraxError):
                raise to_mlflow_error(error) from error
            raise
        trace.finish(output)


def unwrap_chat_model(pyfunc_model: mlflow.pyfunc.PyFuncModel) -> LoraxChatModel:
    """The LoraxChatModel behind a loaded pyfunc model (MLflow wraps ChatModels without `python_model`)."""
    impl = pyfunc_model._model_impl  # the ChatModel wrapper exposes the instance only here
    chat_model = getattr(impl, "chat_model", None) or getattr(impl, "python_model", None)
    if not isinstance(chat_model, LoraxChatModel):
        raise MlflowException(f"not a lorax-mlflow model: {type(chat_model).__name__}", error_code=INVALID_PARAMETER_VALUE)
    return chat_model
