"""The chat surfaces' request builder: an OpenAI chat body (/v1/chat/completions) or the ChatModel's
input (predict, predict_stream, and /invocations through them) -> one PreparedRequest.

One pass: tools, the adapter (resolved by the core), the chat template rendered to prompt ids,
SamplingParams (a forced tool call becomes the output grammar). The engine client
validates the result once when it is submitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlflow.types.llm import ChatMessage, ChatParams

from lorax_mlflow.api.fields import adapter_request, chat_logprobs, sampling_params
from lorax_mlflow.api.schemas import ChatCompletionRequest, MlflowChatRequest, parse_request
from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.service import LoraxService, PreparedRequest
from lorax_mlflow.tools.hermes import forced_call_constraint
from lorax_mlflow.tools.spec import parse_tools


def chat_request(
    service: LoraxService, request: ChatCompletionRequest, *, model: str, bearer_token: str | None = None
) -> PreparedRequest:
    """`model` is the adapter the surface names ("" or the base model's name: the base)."""
    tools = parse_tools(request.to_body())
    adapter = service.engine.adapters.resolve(adapter_request(request, model, bearer_token))
    prompt = service.templates.render(
        [message.to_body() for message in request.messages],
        adapter.folder,
        add_generation_prompt=request.add_generation_prompt,
        chat_template=request.chat_template,
        chat_template_kwargs=request.chat_template_kwargs,
        tools=tools,
    )
    params = sampling_params(request, prompt_len=len(prompt), max_model_len=service.engine.max_model_len,
                             logprobs=chat_logprobs(request))
    if tools is not None and tools.forced:
        if params.structured_output is not None:
            raise InvalidRequestError(
                f"tool_choice {tools.choice!r} forces a tool call, which {params.structured_output.param} "
                "would contradict", param="tool_choice")
        params = dataclasses.replace(params, structured_output=forced_call_constraint(tools))
    return PreparedRequest(prompt, params, adapter, model=model or service.base_model_name, tools=tools)


def mlflow_chat_body(messages: list[ChatMessage], params: ChatParams) -> dict[str, Any]:
    """MLflow's messages and ChatParams as one chat body, `custom_inputs` flattened into it (they win)."""
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


def mlflow_chat_request(service: LoraxService, body: dict[str, Any]) -> PreparedRequest:
    """The ChatModel's request (a body from :func:`mlflow_chat_body`); `adapter_id` names the adapter."""
    request = parse_request(MlflowChatRequest, body)
    return chat_request(service, request, model=request.adapter_id or "")
