"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lorax_mlflow import tracing
from lorax_mlflow.api.chat_request import chat_request
from lorax_mlflow.api.completion_request import completion_requests
from lorax_mlflow.api.openai_chat_format import ChatFormatter
from lorax_mlflow.api.openai_completion_format import CompletionFormatter
from lorax_mlflow.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationFields
from lorax_mlflow.engine.outputs import RequestOutput
from lorax_mlflow.errors import LoraxError
from lorax_mlflow.server.common import bearer_token, off_loop, running_loop, unless_disconnected
from lorax_mlflow.server.metrics import RequestRecord, ServerMetrics
from lorax_mlflow.server.model_source import ModelHolder
from lorax_mlflow.server.openapi import ChatCompletion, Completion, ModelList, OpenAIErrorResponse, errors, ok
from lorax_mlflow.server.sse import DONE, SSE_HEADERS, merged, sse_event
from lorax_mlflow.service import LoraxService, PreparedRequest

logger = logging.getLogger(__name__)


def _log_ignored(body: GenerationFields, route: str) -> None:
    ignored = body.ignored()
    if ignored:
        logger.debug("%s: ignoring %s (they change nothing here)", route, ", ".join(ignored))


def _include_usage(body: GenerationFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _submit_all(service: LoraxService, prepared: list[PreparedRequest]):
    loop = running_loop()
    streams = []
    try:
        for item in prepared:
            streams.append(await off_loop(service.submit, item, loop))
    except LoraxError:
        for stream in streams:
            stream.abort()
        raise
    return streams


async def _finals(outputs: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async for index, output in outputs:
        if output.finished:
            finals[index] = output
    return [finals[i] for i in range(count)]


def openai_router(holder: ModelHolder, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(tags=["OpenAI"])

    async def prepare(record: RequestRecord, make: Any, trace: tracing.RequestTrace
                      ) -> tuple[LoraxService, list[PreparedRequest], list]:
        try:
            service = holder.service
            with trace.template():
                prepared = await off_loop(make, service)
            prepared = prepared if isinstance(prepared, list) else [prepared]
            record.adapter = prepared[0].adapter.adapter_id or "base"
            streams = await _submit_all(service, prepared)
        except LoraxError as error:
            record.close(error.status)
            trace.fail(error)
            raise
        return service, prepared, streams

    @router.post("/v1/chat/completions", responses={**ok(ChatCompletion, streams=True), **errors(OpenAIErrorResponse)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _log_ignored(body, "chat")
        record = metrics.request("chat")
        token = bearer_token(request)
        trace = tracing.start_request("chat.completions", body.to_body())
        service, (prepared,), streams = await prepare(
            record, lambda s: chat_request(s, body, model=body.model, bearer_token=token), trace
        )
        formatter = ChatFormatter(prepared, service.engine.tokenizer, created=int(time.time()))
        if body.stream:
            return StreamingResponse(
                _chat_events(merged(streams), formatter, _include_usage(body), record, trace),
                media_type="text/event-stream", headers=SSE_HEADERS,
            )
        try:
            (output,) = await unless_disconnected(request, _finals(merged(streams), 1))
        except LoraxError as error:
            record.close(error.status)
            trace.fail(error)
            raise
        record.output(output)
        record.close(200)
        response = formatter.response(output)
        trace.finish(output, response)
        return response

    @router.post("/v1/completions", responses={**ok(Completion, streams=True), **errors(OpenAIErrorResponse)})
    async def completions(body: CompletionRequest, request: Request):
        _log_ignored(body, "completions")
        record = metrics.request("completions")
        token = bearer_token(request)
        trace = tracing.start_request("completions", body.to_body())
        service, prepared, streams = await prepare(
            record, lambda s: completion_requests(s, body, bearer_token=token), trace
        )
        formatter = CompletionFormatter(
            prepared, service.engine.tokenizer, created=int(time.time()), echo=body.echo, suffix=body.suffix,
            prompt_tokenizer=service.templates.tokenizer_for(prepared[0].adapter.folder))
        if body.stream:
            return StreamingResponse(
                _completion_events(merged(streams), formatter, len(prepared), _include_usage(body), record, trace),
                media_type="text/event-stream", headers=SSE_HEADERS,
            )
        try:
            finals = await unless_disconnected(request, _finals(merged(streams), len(streams)))
        except LoraxError as error:
            record.close(error.status)
            trace.fail(error)
            raise
        for output in finals:
            record.output(output)
        record.close(200)
        response = formatter.response(finals)
        trace.finish(finals[0], response)
        return response

    @router.get("/v1/models", responses={**ok(ModelList), **errors(OpenAIErrorResponse)})
    async def models():
        service = holder.service
        created = int(time.time())
        base = service.base_model_name
        data = [{"id": base, "object": "model", "created": created, "owned_by": "lorax-mlflow", "root": base,
                 "parent": None}]
        for adapter_id in service.engine.adapters.known_adapter_ids():
            data.append({"id": adapter_id, "object": "model", "created": created, "owned_by": "lorax-mlflow",
                         "root": adapter_id, "parent": base})
        return {"object": "list", "data": data}

    return router


async def _chat_events(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    formatter: ChatFormatter,
    include_usage: bool,
    record: RequestRecord,
    trace: tracing.RequestTrace,
) -> AsyncIterator[str]:
    status = 499  # client closed the stream before the end
    last: RequestOutput | None = None
    try:
        try:
            async for _, output in outputs:
                last = output
                chunk = formatter.chunk(output)
                if chunk is not None:
                    yield sse_event(chunk)
            assert last is not None
            record.output(last)
            trace.finish(last)
            if include_usage:
                yield sse_event(formatter.usage_chunk(last))
            status = 200
        except LoraxError as error:
            status = error.status
            trace.fail(error)
            yield sse_event(error.to_openai())
        yield DONE
    finally:
        if status == 499:
            trace.fail(ConnectionAbortedError("the client left before the end of the stream"))
        record.close(status)


async def _completion_events(
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    formatter: CompletionFormatter,
    prompts: int,
    include_usage: bool,
    record: RequestRecord,
    trace: tracing.RequestTrace,
) -> AsyncIterator[str]:
    status = 499
    finals: dict[int, RequestOutput] = {}
    try:
        try:
            async for prompt_index, output in outputs:
                chunk = formatter.chunk(prompt_index, output)
                if output.finished:
                    finals[prompt_index] = output
                    record.output(output)
                if chunk is not None:
                    yield sse_event(chunk)
            trace.finish(finals[0])
            if include_usage:
                yield sse_event(formatter.usage_chunk([finals[i] for i in range(prompts)]))
            status = 200
        except LoraxError as error:
            status = error.status
            trace.fail(error)
            yield sse_event(error.to_openai())
        yield DONE
    finally:
        if status == 499:
            trace.fail(ConnectionAbortedError("the client left before the end of the stream"))
        record.close(status)
