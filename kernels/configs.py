"""Block sizes for the Triton kernels, from a small table keyed by shape, and the shrink's split-K policy.

Chosen by rule instead of `triton.autotune`, so a launch never benchmarks at run time (tests and
the first request stay fast and deterministic). Keys: tokens per segment (bucketed), rank, and
in_features (shrink) or widest output slice (expand). The values follow the usual shape of such
tables (SGMV/punica, vLLM's LoRA defaults): tiny token blocks for decode, larger token blocks as
segments grow. Re-tune on the target GPU with benchmarks/kernels.py.

Split-K (the shrink's reduction over in_features spread over several programs) has two policies:
  deterministic (default)  the split and the K block depend on in_features and dtype only, never on
                           the batch, the partial sums are added in a fixed order by a second small
                           kernel, and token blocks stay at most 32 rows (DETERMINISTIC_MAX_BLOCK_M):
                           a token's result is bit-identical whatever shares its batch and run to run.
  batch-adaptive           the split grows when the launch has few token tiles, partial sums meet in
                           float32 atomics: the order of the adds, so the low bits, vary with the
                           batch and from run to run. Kept to measure what determinism costs
                           (benchmarks/kernels.py prints both).
Switch with `set_deterministic()` or LORAX_KERNELS_DETERMINISTIC=0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

DETERMINISTIC_ENV_VAR = "LORAX_KERNELS_DETERMINISTIC"
_deterministic = os.environ.get(DETERMINISTIC_ENV_VAR, "1").strip().lower() not in ("0", "false", "no")


def set_deterministic(enabled: bool) -> None:
    """Choose the shrink's split-K policy for this process (see the module docstring)."""
    global _deterministic
    _deterministic = bool(enabled)


def is_deterministic() -> bool:
    return _deterministic


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int
    """in_features each split covers: a contiguous range, a multiple of block_k."""
    atomic: bool
    """Partial sums meet in float32 atomics (batch-adaptive) rather than in a fixed-order sum."""
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


MIN_DOT_BLOCK = 16  # tl.dot needs every block dimension >= 16


def padded_rank(rank: int) -> int:
    """The rank rounded up to a power of two >= 16; the padding is masked in the kernels."""
    return _pow2_at_least(rank)


def _pow2_at_least(n: int) -> int:
    return max(MIN_DOT_BLOCK, 1 << (n - 1).bit_length())


DETERMINISTIC_MAX_BLOCK_M = 32
"""Token blocks of 16 or 32 rows lower tl.dot to the same mma.sync instructions, stepping through K
in the same order for every row: block_m then changes how many tokens a program holds, never a
token's sums. 64-row blocks may lower to Hopper's wgmma instead, whose rounding need not match, so
the deterministic policy stays below them (A and B tiles re-read per 32 tokens come from L2)."""
TARGET_SHRINK_PROGRAMS = 256  # about two waves on a 132-SM H100 / H200
DETERMINISTIC_BLOCK_K = {2: 128, 4: 64}
"""By element size: keeps the [block_k, rank<=128] A tile plus the x tile, double-buffered, near 96 KiB
of shared memory. Fixed per dtype (one per engine), never by the step's rank."""
DETERMINISTIC_K_PER_SPLIT = 1024
"""Each program of the deterministic shrink reduces over at most this many inputs: 4 splits at
hidden 4096, 14 at Llama-3-8B's 14336 (down_proj). Decode launches get enough programs to load
A at full bandwidth, and prefill pays ~2 x split_k x r float32 of partials per token, a few % of x."""


def shrink_config(
    segment_tokens: Sequence[int], num_slices: int, rank: int, in_features: int, element_size: int = 2
) -> ShrinkConfig:
    """segment_tokens: token count of each segment; element_size: bytes per element of x and A."""
    block_n = padded_rank(rank)
    max_tokens = max(segment_tokens)
    block_m = 16 if max_tokens <= 16 else 32 if max_tokens <= 64 else 64
    if _deterministic:
        block_m = min(block_m, DETERMINISTIC_MAX_BLOCK_M)
        block_k = min(DETERMINISTIC_BLOCK_K.get(element_size, 64), _pow2_at_least(in_features))
        k_per_split = max(block_k, DETERMINISTIC_K_PER_SPLIT // block_k * block_k)
        split_k = -(-in_features // k_per_split)
        return ShrinkConfig(block_m, block_n, block_k, split_k, k_per_split, False, num_warps=4, num_stages=2)
    block_k = {16: 256, 32: 128, 64: 64}[block_m]
    if block_n >= 64:  # keep the [block_k, block_n] A tile in registers
        block_k = min(block_k, 64)
    block_k = min(block_k, _pow2_at_least(in_features))
    token_tiles = num_slices * sum(-(-count // block_m) for count in segment_tokens)
    k_blocks = -(-in_features // block_k)
    split_k = max(1, min(TARGET_SHRINK_PROGRAMS // token_tiles, k_blocks))
    k_per_split = -(-k_blocks // split_k) * block_k
    split_k = -(-in_features // k_per_split)
    return ShrinkConfig(block_m, block_n, block_k, split_k, k_per_split, split_k > 1, num_warps=4, num_stages=2)


def expand_config(max_segment_tokens: int, rank: int, max_out_features: int) -> ExpandConfig:
    """Expand reduces over the rank only, inside one tl.dot (a wider zero-padded rank adds exact
    zeros); under the deterministic policy its token blocks stay at most 32 rows, as the shrink's."""
    block_k = padded_rank(rank)
    if max_segment_tokens <= 16:
        block_m, block_n = 16, 128
    elif max_segment_tokens <= 64 or _deterministic:
        block_m, block_n = 32, 128
    else:
        block_m, block_n = 64, 128
    if block_k >= 128:
        block_n = 64
    block_n = min(block_n, _pow2_at_least(max_out_features))
    return ExpandConfig(block_m, block_n, block_k, num_warps=4, num_stages=2)
