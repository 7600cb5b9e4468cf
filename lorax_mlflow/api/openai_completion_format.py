"""The OpenAI completions wire format: engine outputs of a request's prompts -> text_completion
responses and stream chunks (`echo`, `suffix`, logprobs; prompt i's choices at indices i*n...)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lorax_mlflow.api.openai_common import completion_logprobs, envelope, usage
from lorax_mlflow.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from lorax_mlflow.service import PreparedRequest


class CompletionFormatter:
    """One completions request (one engine request per prompt): the whole response, or its stream's
    chunks one output at a time, then the usage chunk when the client asked for it."""

    def __init__(self, prepared: list[PreparedRequest], tokenizer: PreTrainedTokenizerBase, created: int, *,
                 echo: bool, suffix: str | None, prompt_tokenizer: PreTrainedTokenizerBase) -> None:
        self.prepared = prepared
        self.model = prepared[0].model
        self.n = prepared[0].params.n
        self.tokenizer = tokenizer
        self.created = created
        self.echo = echo
        self.suffix = suffix
        self.prompt_tokenizer = prompt_tokenizer
        """Decodes token-id prompts for `echo` (once the engine has checked their ids)."""
        self._started: set[tuple[int, int]] = set()
        self._request_id: str | None = None

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        """`finals`: each prompt's finished output, in prompt order."""
        choices = [
            self._choice(prompt_index, output, choice, self._echo(prompt_index, output))
            for prompt_index, output in enumerate(finals) for choice in output.outputs
        ]
        return self._body(finals[0].request_id, choices, usage(*finals))

    def chunk(self, prompt_index: int, output: RequestOutput) -> dict[str, Any] | None:
        """The chunk for prompt `prompt_index`'s next output; None when it adds nothing to send."""
        self._request_id = self._request_id or output.request_id
        choices = []
        for choice in output.outputs:
            key = (prompt_index, choice.index)
            echo = self._echo(prompt_index, output) if key not in self._started else None
            self._started.add(key)
            if not (choice.delta_text or choice.finish_reason or echo is not None or choice.delta_logprobs):
                continue
            choices.append(self._choice(prompt_index, output, choice, echo, delta=True))
        return self._body(self._request_id, choices, None) if choices else None

    def usage_chunk(self, finals: list[RequestOutput]) -> dict[str, Any]:
        """`stream_options.include_usage`: a last chunk without choices."""
        return self._body(self._request_id or finals[0].request_id, [], usage(*finals))

    def _body(self, request_id: str, choices: list[dict[str, Any]], usage_: dict[str, Any] | None) -> dict[str, Any]:
        return envelope("text_completion", f"cmpl-{request_id}", self.model, self.created, choices, usage_)

    def _echo(self, prompt_index: int, output: RequestOutput) -> str | None:
        if not self.echo:
            return None
        text = self.prepared[prompt_index].prompt_text
        return text if text is not None else self.prompt_tokenizer.decode(output.prompt_token_ids)

    def _choice(self, prompt_index: int, output: RequestOutput, choice: CompletionOutput, echo: str | None, *,
                delta: bool = False) -> dict[str, Any]:
        return _text_choice(
            choice, index=prompt_index * self.n + choice.index, tokenizer=self.tokenizer, prompt_text=echo,
            prompt_logprobs=output.prompt_logprobs if echo is not None else None, suffix=self.suffix, delta=delta,
        )


def _text_choice(
    choice: CompletionOutput,
    *,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str | None = None,
    prompt_logprobs: list[TokenLogprob | None] | None = None,
    suffix: str | None = None,
    delta: bool = False,
) -> dict[str, Any]:
    text = choice.delta_text if delta else choice.text
    logprobs = None
    if choice.logprobs is not None:
        entries = list(choice.delta_logprobs if delta else choice.logprobs)
        prefix: list[TokenLogprob | None] = list(prompt_logprobs or []) if prompt_text is not None else []
        logprobs = completion_logprobs(tokenizer, prefix + entries)
    if prompt_text is not None:
        text = prompt_text + text
    if suffix and choice.finish_reason is not None:
        text += suffix
    return {"index": index, "text": text, "finish_reason": choice.finish_reason, "logprobs": logprobs}
