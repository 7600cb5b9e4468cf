"""Prompt-lookup drafting: propose the tokens that followed the latest earlier occurrence of the sequence's
last n-gram (in the prompt or the output so far). Free to compute and, on extraction, summarisation or
code-editing prompts that copy spans of their input, often right; LoRAX uses it when no Medusa adapter applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_MAX_NGRAM = 3
DEFAULT_MIN_NGRAM = 1


def propose_prompt_lookup(
    token_ids: Sequence[int],
    num_tokens: int,
    *,
    max_ngram: int = DEFAULT_MAX_NGRAM,
    min_ngram: int = DEFAULT_MIN_NGRAM,
) -> list[int]:
    """Up to `num_tokens` draft tokens for the sequence `token_ids` (prompt + output so far).

    Tries the longest suffix n-gram first (``max_ngram`` down to ``min_ngram``); the first n with an
    earlier occurrence wins, and the latest such occurrence is used. Empty when nothing matches.
    """
    length = len(token_ids)
    if num_tokens <= 0 or length < min_ngram + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    # earlier positions holding the last token: the ends of every candidate match, found in one pass
    ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        candidates = ends[ends >= n - 1]
        for back in range(1, n):
            candidates = candidates[tokens[candidates - back] == tokens[length - 1 - back]]
        if candidates.size:
            start = int(candidates[-1]) + 1
            return tokens[start : start + num_tokens].tolist()
    return []
