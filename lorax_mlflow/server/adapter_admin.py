"""Runtime adapter management, vLLM-compatible: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Off unless the operator gives an admin token (``LORAX_ADMIN_TOKEN``); then every call must carry
``Authorization: Bearer <admin token>``, else 401. ``lora_path`` is any adapter id the server
accepts (local folder under the adapter roots, hub repo, s3://, models:/ or runs:/), checked and
loaded before the name answers; afterwards requests use ``model=<lora_name>``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from lorax_mlflow.errors import AdapterAuthError
from lorax_mlflow.server.common import bearer_token, off_loop
from lorax_mlflow.server.model_source import ModelHolder
from lorax_mlflow.service import LoraxService

logger = logging.getLogger(__name__)


class LoadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    adapter_source: str | None = None


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None
    """Sent by some vLLM clients; ignored."""


def preload_adapters(service: LoraxService, adapters: Mapping[str, str]) -> None:
    """Load `name -> adapter id` before the server reports ready (``--preload-adapter NAME=ID``)."""
    for name, adapter_id in adapters.items():
        service.engine.adapters.add_name(name, adapter_id)
        logger.info("preloaded adapter %s as %r", adapter_id, name)


def adapter_admin_router(holder: ModelHolder, admin_token: str) -> APIRouter:
    if not admin_token:
        raise ValueError("runtime adapter management needs a non-empty admin token")
    router = APIRouter(tags=["Adapter management"])

    def authorize(request: Request) -> None:
        given = bearer_token(request) or ""
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            raise AdapterAuthError("adapter management needs the admin token (Authorization: Bearer ...)",
                                   code="admin_unauthorized")

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoraAdapter, request: Request):
        authorize(request)
        adapters = holder.service.engine.adapters
        await off_loop(adapters.add_name, body.lora_name, body.lora_path, body.adapter_source)
        logger.info("adapter %s loaded at runtime as %r", body.lora_path, body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request):
        authorize(request)
        holder.service.engine.adapters.remove_name(body.lora_name)
        logger.info("adapter %r unloaded", body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    return router
