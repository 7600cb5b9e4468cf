"""LoraxChatModel: the engine behind MLflow's ChatModel interface (predict, predict_stream)."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from typing import Any

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

from lorax_mlflow import openai_format, tracing
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

    def _body(self, messages: list[ChatMessage], params: ChatParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{k: v for k, v in m.to_dict().items() if v is not None} for m in messages]
        }
        for key, value in params.to_dict().items():
            if key not in ("custom_inputs", "stream") and value is not None:
                body[key] = value
        body.update(params.custom_inputs or {})
        if body.get("top_k") == 0:  # MLflow clients send 0 for "unset"
            body.pop("top_k")
        return body

    def _service(self) -> LoraxService:
        if self.service is None:
            raise MlflowException("the model is not loaded: load_context() was not called", error_code=INTERNAL_ERROR)
        return self.service

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        service = self._service()
        body = self._body(messages, params)
        trace = tracing.start_request("predict", body)
        try:
            with trace.template():
                prepared = service.prepare_chat(body, model_field=body.get("adapter_id") or None)
            output = service.submit(prepared).result()
            response = openai_format.chat_completion(
                output, model=prepared.model, created=int(time.time()), tokenizer=service.engine.tokenizer,
                tools=prepared.tools,
            )
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
        body = self._body(messages, params)
        trace = tracing.start_request("predict_stream", body)
        created = int(time.time())
        try:
            with trace.template():
                prepared = service.prepare_chat(body, model_field=body.get("adapter_id") or None)
            deltas = openai_format.ChatDeltas(service.engine.tokenizer, prepared.tools)
            for output in service.submit(prepared):
                choices = deltas.choices(output)
                if choices:
                    yield ChatCompletionChunk.from_dict(
                        openai_format.chat_chunk(output.request_id, prepared.model, created, choices)
                    )
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
