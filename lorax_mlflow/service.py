"""Prepared requests -> engine submissions, shared by the ChatModel and the server.

The request builders (lorax_mlflow/api/) turn each surface's body into a :class:`PreparedRequest`
with the templates and adapters held here; :meth:`LoraxService.submit` starts it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from lorax_mlflow.adapters.cache import ResolvedAdapter
from lorax_mlflow.chat.templates import ChatTemplates
from lorax_mlflow.client.cancel_scope import join_current_scope
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.client.stream import RequestStream
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.tools.spec import ToolRequest


@dataclass
class PreparedRequest:
    """What the engine runs for one request: prompt ids, SamplingParams, the resolved adapter."""

    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: ResolvedAdapter
    model: str
    """What to echo in the response's `model` field."""
    prompt_text: str | None = None
    """For completions with echo, a text prompt as given (token-id prompts are decoded when shown)."""
    tools: ToolRequest | None = None
    """Chat with tools: the output is parsed for tool calls."""


class LoraxService:
    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.templates = ChatTemplates(engine.tokenizer,
                                       trust_request_templates=engine.config.trust_request_chat_template)

    @property
    def base_model_name(self) -> str:
        return self.engine.base_model_name

    def submit(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Start `prepared`; inside a CancelScope (/invocations), cancelling the scope aborts it."""
        return join_current_scope(
            self.engine.submit(prepared.prompt_token_ids, prepared.params, prepared.adapter, loop=loop))

