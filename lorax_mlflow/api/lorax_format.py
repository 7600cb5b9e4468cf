"""Engine outputs -> LoRAX /generate and /generate_stream JSON (TGI's shapes, which lorax-client parses)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lorax_mlflow.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from lorax_mlflow.engine.sampling_params import SamplingParams


class LoraxFormatter:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: set[int], params: SamplingParams,
                 *, alternatives: int | None, prompt_text: str | None) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = set(eos_token_ids) | set(params.stop_token_ids)
        self.special_ids = set(tokenizer.all_special_ids)
        self.params = params
        self.alternatives = alternatives
        self.prompt_text = prompt_text
        """Prepended to generated_text when return_full_text is set."""

    def finish_reason(self, choice: CompletionOutput) -> str:
        """LoRAX distinguishes the end-of-sequence token from a stop sequence."""
        if choice.finish_reason == "length":
            return "length"
        if choice.token_ids and choice.token_ids[-1] in self.stop_ids:
            return "eos_token"
        return "stop_sequence"

    def seed(self, index: int) -> int | None:
        """The engine seeds sequence i of a request with seed + i."""
        return None if self.params.greedy or self.params.seed is None else self.params.seed + index

    def token(self, token_id: int, entry: TokenLogprob | None, text: str | None = None) -> dict[str, Any]:
        token: dict[str, Any] = {
            "id": token_id,
            "text": self.tokenizer.decode([token_id]) if text is None else text,
            "logprob": entry.logprob if entry is not None else None,
            "special": token_id in self.special_ids,
        }
        if self.alternatives and entry is not None:
            token["alternative_tokens"] = [
                {"id": alt, "text": self.tokenizer.decode([alt]), "logprob": logprob} for alt, logprob in entry.top
            ]
        return token

    def generated_text(self, choice: CompletionOutput) -> str:
        return (self.prompt_text or "") + choice.text

    def _prefill(self, output: RequestOutput) -> list[dict[str, Any]]:
        if output.prompt_logprobs is None:
            return []
        prefill = []
        for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs):
            prefill.append({"id": token_id, "text": self.tokenizer.decode([token_id]),
                            "logprob": None if entry is None else entry.logprob})
        return prefill

    def _sequence(self, output: RequestOutput, choice: CompletionOutput) -> dict[str, Any]:
        entries = choice.logprobs or [None] * len(choice.token_ids)
        return {
            "finish_reason": self.finish_reason(choice),
            "generated_tokens": len(choice.token_ids),
            "seed": self.seed(choice.index),
            "prefill": self._prefill(output),
            "tokens": [self.token(t, e) for t, e in zip(choice.token_ids, entries)],
            **speculation_details(choice),
        }

    def response(self, output: RequestOutput, *, details: bool) -> dict[str, Any]:
        """/generate: the most likely sequence; with best_of the others go to best_of_sequences."""
        ranked = sorted(output.outputs, key=lambda c: c.cumulative_logprob, reverse=True)
        best = ranked[0]
        body: dict[str, Any] = {"generated_text": self.generated_text(best)}
        if details:
            body["details"] = {"prompt_tokens": output.num_prompt_tokens, **self._sequence(output, best)}
            if len(ranked) > 1:
                body["details"]["best_of_sequences"] = [
                    {"generated_text": self.generated_text(c), **self._sequence(output, c)} for c in ranked[1:]
                ]
        return body

    def stream_events(self, output: RequestOutput) -> list[dict[str, Any]]:
        """One event per new token. The text of a step goes on its last token, so that the token texts
        add up to generated_text even when the detokenizer held bytes back (multi-byte characters)."""
        choice = output.outputs[0]
        entries = choice.delta_logprobs or [None] * len(choice.delta_token_ids)
        last = len(choice.delta_token_ids) - 1
        return [
            {"token": self.token(t, e, text=choice.delta_text if i == last else ""), "generated_text": None,
             "details": None}
            for i, (t, e) in enumerate(zip(choice.delta_token_ids, entries))
        ]

    def finish_stream(self, event: dict[str, Any], output: RequestOutput, *, details: bool) -> dict[str, Any]:
        """The last event carries generated_text and (when asked) the stream details."""
        choice = output.outputs[0]
        event["generated_text"] = self.generated_text(choice)
        if details:
            event["details"] = {
                "finish_reason": self.finish_reason(choice),
                "prompt_tokens": output.num_prompt_tokens,
                "generated_tokens": len(choice.token_ids),
                "seed": self.seed(0),
                **speculation_details(choice),
            }
        return event


def speculation_details(choice: CompletionOutput) -> dict[str, Any]:
    """Draft tokens verified and accepted, and the acceptance rate, for a sequence that speculated."""
    if not choice.num_draft_tokens:
        return {}
    return {
        "draft_tokens": choice.num_draft_tokens,
        "accepted_draft_tokens": choice.num_accepted_draft_tokens,
        "acceptance_rate": choice.num_accepted_draft_tokens / choice.num_draft_tokens,
    }
