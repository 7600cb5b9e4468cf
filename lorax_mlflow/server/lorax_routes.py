"""LoRAX's native routes: /generate, /generate_stream, and `/` (where lorax-client posts both)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lorax_mlflow import tracing
from lorax_mlflow.api.generate_request import generate_request
from lorax_mlflow.api.lorax_format import LoraxFormatter
from lorax_mlflow.api.schemas import GenerateRequest
from lorax_mlflow.client.stream import RequestStream
from lorax_mlflow.errors import LoraxError
from lorax_mlflow.server.common import bearer_token, off_loop, running_loop, unless_disconnected
from lorax_mlflow.server.errors import lorax_error_body
from lorax_mlflow.server.metrics import RequestRecord, ServerMetrics
from lorax_mlflow.server.model_source import ModelHolder
from lorax_mlflow.server.openapi import SSE, SSE_EVENT_SCHEMA, GenerateResponse, LoraxErrorResponse, errors, ok
from lorax_mlflow.server.sse import SSE_HEADERS, sse_event


def lorax_router(holder: ModelHolder, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(tags=["LoRAX"])

    async def start(body: GenerateRequest, request: Request, route: str, stream: bool):
        record = metrics.request(route)
        trace = tracing.start_request(route, body.to_body())
        try:
            service = holder.service
            with trace.template():
                prepared = await off_loop(generate_request, service, body, stream=stream,
                                          bearer_token=bearer_token(request))
            record.adapter = prepared.adapter.adapter_id or "base"
            handle = await off_loop(service.submit, prepared, running_loop())
        except LoraxError as error:
            record.close(error.status)
            trace.fail(error)
            raise
        formatter = LoraxFormatter(
            service.templates.tokenizer_for(prepared.adapter.folder), service.engine.eos_token_ids, prepared.params,
            alternatives=body.parameters.return_k_alternatives,
            prompt_text=body.inputs if body.parameters.return_full_text else None,
        )
        return record, handle, formatter, trace

    async def generate_response(body: GenerateRequest, request: Request, route: str) -> dict[str, Any]:
        record, handle, formatter, trace = await start(body, request, route, stream=False)
        try:
            output = await unless_disconnected(request, handle.aresult())
        except LoraxError as error:
            record.close(error.status)
            trace.fail(error)
            raise
        record.output(output)
        record.close(200)
        response = formatter.response(output, details=body.parameters.details)
        trace.finish(output, response)
        return response

    async def stream_response(body: GenerateRequest, request: Request, route: str) -> StreamingResponse:
        record, handle, formatter, trace = await start(body, request, route, stream=True)
        return StreamingResponse(_token_events(handle, formatter, record, trace, details=body.parameters.details),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @router.post("/generate", responses={**ok(GenerateResponse), **errors(LoraxErrorResponse)})
    async def generate(body: GenerateRequest, request: Request):
        """Generate text: `{"generated_text", "details"}`."""
        return await generate_response(body, request, "generate")

    @router.post("/generate_stream", response_class=StreamingResponse, responses={
        200: {"description": "token events", "content": {SSE: {"schema": SSE_EVENT_SCHEMA}}},
        **errors(LoraxErrorResponse)})
    async def generate_stream(body: GenerateRequest, request: Request):
        """Stream tokens as server-sent events: `{"token", "generated_text", "details"}`."""
        return await stream_response(body, request, "generate_stream")

    @router.post("/", responses={**ok(list[GenerateResponse], streams=True), **errors(LoraxErrorResponse)})
    async def compat_generate(body: GenerateRequest, request: Request):
        """lorax-client's route: a one-element list when `stream` is false, else the token stream."""
        if body.stream:
            return await stream_response(body, request, "generate_stream")
        return [await generate_response(body, request, "generate")]

    return router


async def _token_events(
    handle: RequestStream, formatter: LoraxFormatter, record: RequestRecord, trace: tracing.RequestTrace, *,
    details: bool,
) -> AsyncIterator[str]:
    """Each token event is held until the next arrives, so the last one can carry generated_text."""
    status = 499
    pending: dict[str, Any] | None = None
    try:
        try:
            async for output in handle:
                events = formatter.stream_events(output)
                if not events and pending is not None:
                    pending["token"]["text"] += output.outputs[0].delta_text
                for event in events:
                    if pending is not None:
                        yield sse_event(pending)
                    pending = event
                if output.finished:
                    record.output(output)
                    trace.finish(output)
                    if pending is not None:
                        yield sse_event(formatter.finish_stream(pending, output, details=details))
                    pending = None
            status = 200
        except LoraxError as error:
            status = error.status
            trace.fail(error)
            yield sse_event(lorax_error_body(error))
    finally:
        if status == 499:
            trace.fail(ConnectionAbortedError("the client left before the end of the stream"))
        handle.abort()
        record.close(status)
