"""Incremental detokenization with stop strings, for streaming.

Each new token is decoded inside a short window of recent tokens (vLLM's prefix_offset /
read_offset technique): the text of the window without the new tokens is subtracted from the text
of the window with them. The window starts a few prompt tokens back, so tokenizers that drop the
leading space of the first decoded token (sentencepiece) still give the first output token its
space. A window whose text ends in U+FFFD is an incomplete multi-byte character: nothing is
emitted until a later token completes it (or until `flush`).

Stop strings are searched in the not-yet-emitted text; the longest suffix of it that could still
grow into a stop string is held back, so a stop string is never partially emitted.
"""

from __future__ import annotations

from lorax_mlflow.engine.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def special_token_ids(tokenizer) -> set[int]:
    """Ids that `decode(skip_special_tokens=True)` drops: the special tokens and added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text, one token at a time.

    Everything returned by `add` and then `flush` concatenates to `text`. With
    `spaces_between_special_tokens` (and special tokens kept), each special token is its own
    segment and segments are joined by single spaces, as HF slow tokenizers and vLLM do; otherwise
    `text` equals `tokenizer.decode(output_ids, skip_special_tokens=...)` cut at the stop string.
    """

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._special_ids = special_token_ids(tokenizer)
        self._special_is_segment = not self._skip_special and params.spaces_between_special_tokens
        self._emitted: list[str] = []
        self._pending = ""  # decoded, not yet emitted (could be the start of a stop string)
        self._space_before_next = False
        self.stop_string: str | None = None
        self._ids = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    @property
    def text(self) -> str:
        """The output text emitted so far (by `add` and `flush`)."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def finished(self) -> bool:
        return self.stop_string is not None

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that is now safe to emit (may be "")."""
        if self.finished or (self._skip_special and token_id in self._special_ids):
            return ""
        if self._special_is_segment and token_id in self._special_ids:
            self._pending += self._decode_window(final=True)
            separator = " " if self._has_output() else ""
            self._pending += separator + self._tokenizer.convert_ids_to_tokens(token_id)
            self._ids, self._prefix_offset, self._read_offset = [], 0, 0
            self._space_before_next = True
        else:
            self._ids.append(token_id)
            self._pending += self._decode_window(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: the held-back text that is still valid output."""
        if self.finished:
            return ""
        self._pending += self._decode_window(final=True)
        return self._release(final=True)

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few prompt tokens, dropping any that end in an incomplete character."""
        if self._special_is_segment:
            return []  # a new segment starts at the output
        context = [t for t in prompt_token_ids[-PROMPT_CONTEXT_TOKENS * 2 :]
                   if not (self._skip_special and t in self._special_ids)][-PROMPT_CONTEXT_TOKENS:]
        while context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context.pop()
        return context

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _decode_window(self, final: bool) -> str:
        """New text of the window's unread tokens; "" while they end in an incomplete character."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not final and new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if delta and self._space_before_next:
            self._space_before_next = False
            delta = " " + delta
        return delta

    def _has_output(self) -> bool:
        return bool(self._pending) or any(self._emitted)

    def _release(self, final: bool) -> str:
        """Emit the pending text up to a stop string or up to what could still start one."""
        match = self._find_stop()
        if match is not None:
            index, stop = match
            self.stop_string = stop
            out = self._pending[: index + len(stop) if self._include_stop else index]
            self._pending = ""
        elif final:
            out, self._pending = self._pending, ""
        else:
            keep = self._possible_stop_prefix_length()
            cut = len(self._pending) - keep
            out, self._pending = self._pending[:cut], self._pending[cut:]
        if out:
            self._emitted.append(out)
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        """The earliest stop string in the pending text (the longest one when two start together)."""
        found = [(self._pending.find(stop), -len(stop), stop) for stop in self._stops]
        found = [f for f in found if f[0] >= 0]
        if not found:
            return None
        index, _, stop = min(found)
        return index, stop

    def _possible_stop_prefix_length(self) -> int:
        """Length of the longest pending suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest
