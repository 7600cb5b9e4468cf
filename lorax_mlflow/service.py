"""Requests in OpenAI/LoRAX shape -> engine submissions, shared by the ChatModel and the server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorax_mlflow.adapters.cache import ResolvedAdapter
from lorax_mlflow.beam_search import Beam, BeamSearchParams, beam_search
from lorax_mlflow.chat.templates import ChatTemplates
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.client.stream import RequestStream
from lorax_mlflow.engine.outputs import CompletionOutput, RequestOutput
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError, LoraxError, require_valid_text
from lorax_mlflow.tools.hermes import forced_call_constraint
from lorax_mlflow.tools.spec import ToolRequest, parse_tools
from lorax_mlflow.translate import adapter_request, beam_search_params, sampling_params

logger = logging.getLogger(__name__)


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
    beam: BeamSearchParams | None = None
    """use_beam_search: run by :meth:`LoraxService.submit` as a beam search."""


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
        beam = beam_search_params(body, params)
        return PreparedRequest(prompt, params, adapter, model=model_field or self.base_model_name, tools=tools,
                               beam=beam)

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
            beam = beam_search_params(body, params)
            text = None
            if body.get("echo"):
                text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
            prepared.append(PreparedRequest(ids, params, adapter, model=model_field or self.base_model_name,
                                            prompt_text=text, beam=beam))
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
        if prepared.beam is not None:
            return self._beam_search(prepared, loop)
        return self.engine.submit(prepared.prompt_token_ids, prepared.params, prepared.adapter, loop=loop)

    def _beam_search(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop | None) -> RequestStream:
        """Run the beam search on a thread of its own; its stream gets the final output (or the error).
        Leaving the stream stops the search at its next step."""
        beam = prepared.beam
        assert beam is not None
        request_id = uuid.uuid4().hex
        stopped = threading.Event()
        stream = RequestStream(request_id, lambda _: stopped.set(), loop)
        step = dataclasses.replace(prepared.params, max_tokens=1, temperature=0.0, n=1, best_of=None,
                                   logprobs=2 * beam.width, ignore_eos=False)
        # the engine's own checks (context length, vocabulary, limits), as for a plain request of that length
        self.engine.submit(prepared.prompt_token_ids, dataclasses.replace(step, max_tokens=beam.max_tokens),
                           prepared.adapter).abort()

        def alternatives(continuations: list[list[int]]) -> list[list[tuple[int, float]]]:
            if stopped.is_set():
                raise LoraxError("the caller left", code="aborted")
            streams = [self.engine.submit(prepared.prompt_token_ids + c, step, prepared.adapter) for c in continuations]
            return [s.result().outputs[0].logprobs[0].top for s in streams]

        def run() -> None:
            try:
                stop_ids = set(self.engine.eos_token_ids) | set(prepared.params.stop_token_ids)
                beams = beam_search(alternatives, beam, stop_ids)
                stream.put(self._beam_output(request_id, prepared, beams))
            except LoraxError as error:
                stream.put(error)
            except Exception as error:  # a bug must fail this request, never hang its caller
                logger.exception("beam search failed")
                stream.put(LoraxError(f"internal error during beam search: {error}", code="internal_error"))

        threading.Thread(target=run, name=f"beam-search-{request_id[:8]}", daemon=True).start()
        return stream

    def _beam_output(self, request_id: str, prepared: PreparedRequest, beams: list[Beam]) -> RequestOutput:
        tokenizer = self.templates.tokenizer_for(prepared.adapter.folder)
        outputs = []
        for index, beam in enumerate(beams):
            shown = beam.token_ids[:-1] if beam.finished and not prepared.params.include_stop_str_in_output else beam.token_ids
            text = tokenizer.decode(shown, skip_special_tokens=prepared.params.skip_special_tokens)
            outputs.append(CompletionOutput(index=index, text=text, token_ids=beam.token_ids,
                                            finish_reason="stop" if beam.finished else "length",
                                            cumulative_logprob=beam.cumulative_logprob, delta_text=text,
                                            delta_token_ids=beam.token_ids))
        return RequestOutput(request_id, prepared.prompt_token_ids, outputs, finished=True,
                             adapter_id=prepared.adapter.adapter_id or None)


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
