"""The FastAPI application: OpenAI, LoRAX and MLflow routes over one LoraxService, plus health and metrics."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from lorax_mlflow import __version__
from lorax_mlflow.server.adapter_admin import adapter_admin_router
from lorax_mlflow.server.body_limit import BodyLimitMiddleware, resolve_max_request_bytes
from lorax_mlflow.server.errors import install_error_handlers
from lorax_mlflow.server.lorax_routes import lorax_router
from lorax_mlflow.server.metrics import CONTENT_TYPE, ServerMetrics
from lorax_mlflow.server.mlflow_routes import mlflow_router
from lorax_mlflow.server.model_source import ModelHolder, ModelSource
from lorax_mlflow.server.openai_routes import openai_router
from lorax_mlflow.server.openapi import Health, drop_fastapi_422, ok


def create_app(source: ModelSource, *, admin_token: str | None = None, max_request_bytes: int | None = None) -> FastAPI:
    """An app serving `source`: a LoraxService, a ServedModel, or a loader returning a ServedModel.

    A loader runs in a background thread once the app starts; until it returns, /health and every
    other route answer 503. `admin_token` enables runtime adapter management (`adapter_admin`).
    Request bodies over `max_request_bytes` (default: ``LORAX_MAX_REQUEST_BYTES``, else 4 MiB) get a
    413 before they are read further or parsed: a declared Content-Length over it is refused before
    the first byte, a chunked body as soon as it passes the limit.
    """
    holder = ModelHolder(source)
    metrics = ServerMetrics(lambda: holder.service if holder.ready else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        holder.start_loading()
        yield

    app = FastAPI(title="lorax-mlflow", version=__version__, lifespan=lifespan,
                  description="Multi-LoRA serving: OpenAI-compatible, LoRAX-native and MLflow routes")
    app.state.holder = holder
    app.add_middleware(BodyLimitMiddleware, max_bytes=resolve_max_request_bytes(max_request_bytes))
    install_error_handlers(app)
    app.include_router(openai_router(holder, metrics))
    app.include_router(lorax_router(holder, metrics))
    app.include_router(mlflow_router(holder, metrics))
    if admin_token:
        app.include_router(adapter_admin_router(holder, admin_token))

    @app.get("/health", tags=["Operations"], responses={**ok(Health), 503: {"model": Health, "description": "loading"}})
    async def health():
        """200 once the model is loaded and its engine core runs; 503 while it loads, if loading failed,
        or while the engine core is down (the next generation request starts a new one)."""
        if holder.ready:
            down = holder.service.engine.health
            if down is not None:
                return JSONResponse({"status": "engine_down", "error": down}, status_code=503)
            return {"status": "ok"}
        if holder.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(holder.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics", tags=["Operations"], response_class=PlainTextResponse)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    drop_fastapi_422(app)
    return app
