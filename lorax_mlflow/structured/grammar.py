"""Compiled grammars (one per distinct constraint) and the per-sequence matchers that walk them."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError

import torch
import xgrammar as xgr

from lorax_mlflow.errors import EngineUnavailableError, InvalidRequestError
from lorax_mlflow.structured.constraints import Constraint

logger = logging.getLogger(__name__)

_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


class TokenRejectedError(RuntimeError):
    """A token outside the grammar's mask reached accept(): the mask was not applied to that row."""


class RequestGrammar:
    """The grammar state of one generated sequence: its next-token mask, and advancing by a token."""

    def __init__(self, matcher: xgr.GrammarMatcher, special_tokens_keep_mask: torch.Tensor | None) -> None:
        self._matcher = matcher
        self._keep_mask = special_tokens_keep_mask

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Write the allowed next tokens into row `index` of an int32 [B, ceil(V/32)] CPU bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, index)
        if self._keep_mask is not None:
            bitmask[index].bitwise_and_(self._keep_mask)

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(int(token_id)):
            raise TokenRejectedError(f"token {token_id} is not allowed by the grammar here")

    def is_terminated(self) -> bool:
        """True once the constrained text is complete and the stop token that ends it was accepted."""
        return self._matcher.is_terminated()

    def fork(self) -> RequestGrammar:
        """An independent copy of this state (for sequences that share a prompt, n > 1)."""
        return RequestGrammar(self._matcher.fork(), self._keep_mask)


def _special_tokens_keep_mask(tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> torch.Tensor | None:
    """A bitmask row that clears special tokens other than the stop tokens.

    xgrammar reads special added tokens such as ``<|im_start|>`` as their literal text, so it would
    allow them inside JSON strings; decoding with ``skip_special_tokens`` would then drop them and
    change the string the grammar checked (its length, an enum value).
    """
    added_tokens = getattr(tokenizer, "added_tokens_decoder", {})
    special = {token_id for token_id, added in added_tokens.items() if added.special}
    special.update(tokenizer.all_special_ids)
    forbidden = sorted(t for t in special - set(stop_token_ids) if 0 <= t < vocab_size)
    if not forbidden:
        return None
    words = [0xFFFFFFFF] * math.ceil(vocab_size / 32)
    for token_id in forbidden:
        words[token_id // 32] &= ~(1 << (token_id % 32)) & 0xFFFFFFFF
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def _compile_error_message(error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _XGRAMMAR_LOG_PREFIX.sub("", first_line)


class GrammarCache:
    """Compiles each distinct constraint once (keyed by its `cache_key`) and hands out matchers.

    EOS is allowed only once the constrained text is complete. Thread-safe: each distinct constraint
    compiles once, on a thread of its own, while callers wait for it without holding any lock, so a
    slow compile delays only the requests that carry that constraint.

    Compile time is bounded per request: xgrammar's compile time grows steeply with ambiguity (a
    grammar of 400 ``"a"*`` items, 3 KB of text, took 38 s on one thread here), and it cannot be
    interrupted. A
    caller waits at most `compile_timeout_s`, then gets a 400; the compile goes on in the background
    (xgrammar releases the GIL) and is cached if it ends. At most `max_overdue_compiles` such
    overdue compiles run at once; while that many do, a constraint not yet compiled gets a 503.
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        *,
        stop_token_ids: Sequence[int] | None = None,
        max_grammars: int = 256,
        compile_timeout_s: float = 10.0,
        max_overdue_compiles: int = 4,
    ) -> None:
        """`vocab_size` is the model's logits width (may exceed len(tokenizer)). `stop_token_ids`
        defaults to the tokenizer's EOS; pass the model's full EOS list when it has several."""
        if stop_token_ids is None and tokenizer.eos_token_id is not None:
            stop_token_ids = [tokenizer.eos_token_id]
        stop_token_ids = list(stop_token_ids) if stop_token_ids else None
        self.vocab_size = vocab_size
        self._tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self._compiler = xgr.GrammarCompiler(self._tokenizer_info, cache_enabled=False)
        self._keep_mask = _special_tokens_keep_mask(tokenizer, vocab_size, self._tokenizer_info.stop_token_ids)
        self._max_grammars = max_grammars
        self.compile_timeout_s = compile_timeout_s
        self._max_overdue = max_overdue_compiles
        self._grammars: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._compiling: dict[str, Future] = {}
        self._overdue: set[str] = set()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._tokenizer_info.stop_token_ids)

    @property
    def overdue_compiles(self) -> int:
        """Compiles still running after a caller stopped waiting for them."""
        with self._lock:
            return len(self._overdue)

    def compiled(self, fmt: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar for `fmt`; raises InvalidRequestError if xgrammar cannot compile it,
        or cannot within `compile_timeout_s`."""
        key = fmt.cache_key
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                self.hits += 1
                return grammar
            pending = self._compiling.get(key)
            if pending is None:
                if len(self._overdue) >= self._max_overdue:
                    raise EngineUnavailableError(
                        f"{fmt.param}: {len(self._overdue)} grammars that took longer than "
                        f"{self.compile_timeout_s:g} s are still compiling; retry later", code="grammar_compiler_busy")
                self.misses += 1
                pending = self._compiling[key] = Future()
                threading.Thread(target=self._compile_into, args=(key, fmt, pending), name="grammar-compile",
                                 daemon=True).start()
            else:
                self.hits += 1  # another request's compile of the same constraint: joined, not repeated
        try:
            return pending.result(timeout=self.compile_timeout_s)
        except FutureTimeoutError:
            with self._lock:
                if not pending.done():
                    self._overdue.add(key)
            raise InvalidRequestError(
                f"{fmt.param}: {fmt.subject} did not compile within {self.compile_timeout_s:g} s; simplify it "
                "(fewer nested or ambiguous repetitions)", param=fmt.param) from None

    def matcher(self, fmt: Constraint) -> RequestGrammar:
        return RequestGrammar(xgr.GrammarMatcher(self.compiled(fmt)), self._keep_mask)

    def _compile_into(self, key: str, fmt: Constraint, pending: Future) -> None:
        try:
            grammar = self._compile(fmt)
        except BaseException as error:  # InvalidRequestError, or a failure to report to the waiting caller
            with self._lock:
                self._compiling.pop(key, None)
                self._overdue.discard(key)
            pending.set_exception(error)
            return
        with self._lock:
            self._grammars[key] = grammar
            if len(self._grammars) > self._max_grammars:
                self._grammars.popitem(last=False)
            self._compiling.pop(key, None)
            self._overdue.discard(key)
        pending.set_result(grammar)

    def _compile(self, fmt: Constraint) -> xgr.CompiledGrammar:
        started = time.perf_counter()
        try:
            grammar = fmt.compile(self._compiler)
        except Exception as e:  # xgrammar rejects what the request wrote: the caller's mistake
            raise InvalidRequestError(
                f"{fmt.param}: {fmt.subject} is not supported: {_compile_error_message(e)}", param=fmt.param
            ) from e
        logger.debug("compiled a %s grammar in %.1f ms", fmt.param, 1000 * (time.perf_counter() - started))
        return grammar
