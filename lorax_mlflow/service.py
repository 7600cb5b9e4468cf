"""Requests in OpenAI/LoRAX shape -> engine submissions, shared by the ChatModel and the server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorax_mlflow.adapters.cache import ResolvedAdapter
from lorax_mlflow.chat.templates import ChatTemplates
from lorax_mlflow.client.cancel_scope import join_current_scope
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.client.stream import RequestStream
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError, require_valid_text
from lorax_mlflow.tools.hermes import forced_call_constraint
from lorax_mlflow.tools.spec import ToolRequest, parse_tools
from lorax_mlflow.translate import adapter_request, sampling_params


@dataclass
class PreparedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: ResolvedAdapter
    model: str
    """What to echo in the response's `model` field."""
    prompt_text: str | None = None
    """For completions with echo."""
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

    def _adapter(self, body: Mapping[str, Any], model_field: str | None, bearer_token: str | None) -> ResolvedAdapter:
        return self.engine.adapters.resolve(adapter_request(body, model_field=model_field, bearer_token=bearer_token))

    def prepare_chat(
        self, body: Mapping[str, Any], *, model_field: str | None = None, bearer_token: str | None = None
    ) -> PreparedRequest:
        messages = body.get("messages")
        if isinstance(messages, str):  # one user message, as the RunPod vLLM worker accepts
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list):
            raise InvalidRequestError("messages must be a string or a list of chat messages", param="messages")
        tools = parse_tools(body)
        adapter = self._adapter(body, model_field, bearer_token)
        prompt = self.templates.render(
            messages,
            adapter.folder,
            add_generation_prompt=body.get("add_generation_prompt", True),
            chat_template=body.get("chat_template"),
            chat_template_kwargs=body.get("chat_template_kwargs"),
            tools=tools,
        )
        params = sampling_params(body, prompt_len=len(prompt), max_model_len=self.engine.max_model_len)
        if tools is not None and tools.forced:
            if params.structured_output is not None:
                raise InvalidRequestError(
                    f"tool_choice {tools.choice!r} forces a tool call, which {params.structured_output.param} "
                    "would contradict", param="tool_choice")
            params = dataclasses.replace(params, structured_output=forced_call_constraint(tools))
        return PreparedRequest(prompt, params, adapter, model=model_field or self.base_model_name, tools=tools)

    def prepare_completions(
        self, body: Mapping[str, Any], *, model_field: str | None = None, bearer_token: str | None = None
    ) -> list[PreparedRequest]:
        """One prepared request per prompt (str, list of str, token ids, or list of token id lists)."""
        prompts = _prompts(body.get("prompt"))
        self._check_request_size(prompts, body)
        adapter = self._adapter(body, model_field, bearer_token)
        tokenizer = self.templates.tokenizer_for(adapter.folder)
        prepared = []
        for prompt in prompts:
            ids = tokenizer.encode(require_valid_text(prompt, "prompt")) if isinstance(prompt, str) else prompt
            params = sampling_params(body, prompt_len=len(ids), max_model_len=self.engine.max_model_len, completions=True)
            text = None
            if body.get("echo"):
                text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
            prepared.append(PreparedRequest(ids, params, adapter, model=model_field or self.base_model_name,
                                            prompt_text=text))
        return prepared

    def _check_request_size(self, prompts: list, body: Mapping[str, Any]) -> None:
        """Caps on prompts per request and on the sequences they start (prompts x max(n, best_of))."""
        config = self.engine.config
        if len(prompts) > config.max_prompts_per_request:
            raise InvalidRequestError(
                f"prompt: at most {config.max_prompts_per_request} prompts per request, got {len(prompts)}",
                param="prompt",
            )
        per_prompt = max(_small_int(body.get("n")), _small_int(body.get("best_of")))
        if len(prompts) * per_prompt > config.max_sequences_per_request:
            raise InvalidRequestError(
                f"n: {len(prompts)} prompts x {per_prompt} sequences each is above this server's limit of "
                f"{config.max_sequences_per_request} sequences per request", param="n",
            )

    def prepare_generate(self, inputs: str, parameters: SamplingParams, body: Mapping[str, Any],
                         bearer_token: str | None = None) -> PreparedRequest:
        """LoRAX /generate: raw text prompt, parameters already mapped to SamplingParams."""
        adapter = self._adapter(body, None, bearer_token)
        tokenizer = self.templates.tokenizer_for(adapter.folder)
        return PreparedRequest(tokenizer.encode(require_valid_text(inputs, "inputs")), parameters, adapter, model=adapter.adapter_id or self.base_model_name)

    def submit(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Start `prepared`; inside a CancelScope (/invocations), cancelling the scope aborts it."""
        return join_current_scope(
            self.engine.submit(prepared.prompt_token_ids, prepared.params, prepared.adapter, loop=loop))


def _small_int(value: Any) -> int:
    """An n / best_of value for the size check (validated for real later): 1 when absent or not an int."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def _prompts(prompt: Any) -> list[str | list[int]]:
    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return list(prompt)
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, a list of token ids, or a list of token id lists",
        param="prompt",
    )
