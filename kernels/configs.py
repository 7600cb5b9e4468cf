"""Block sizes for the Triton kernels, from a small table keyed by shape.

Chosen by rule instead of `triton.autotune`, so a launch never benchmarks at run time (tests and
the first request stay fast and deterministic). Keys: tokens per segment (bucketed), rank, and
in_features (shrink) or widest output slice (expand); shrink's split-K also looks at how many
token tiles the launch has, to keep the GPU busy when there are few. The values follow the usual shape of such
tables (SGMV/punica, vLLM's LoRA defaults): tiny token blocks and deep split-K for decode, larger
token blocks as segments grow. Re-tune on the target GPU with benchmarks/kernels.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
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
    return max(MIN_DOT_BLOCK, 1 << (rank - 1).bit_length())


TARGET_SHRINK_PROGRAMS = 256  # about two waves on a 132-SM H100


def shrink_config(segment_tokens: Sequence[int], num_slices: int, rank: int, in_features: int) -> ShrinkConfig:
    """segment_tokens: token count of each segment. When the launch has few (segment, slice, token
    block) tiles, the reduction over in_features is split so the GPU still gets enough programs."""
    block_n = padded_rank(rank)
    max_tokens = max(segment_tokens)
    block_m = 16 if max_tokens <= 16 else 32 if max_tokens <= 64 else 64
    block_k = {16: 256, 32: 128, 64: 64}[block_m]
    if block_n >= 64:  # keep the [block_k, block_n] A tile in registers
        block_k = min(block_k, 64)
    block_k = min(block_k, max(MIN_DOT_BLOCK, 1 << (in_features - 1).bit_length()))
    token_tiles = num_slices * sum(-(-count // block_m) for count in segment_tokens)
    k_blocks = -(-in_features // block_k)
    split_k = max(1, min(TARGET_SHRINK_PROGRAMS // token_tiles, k_blocks))
    return ShrinkConfig(block_m, block_n, block_k, split_k, num_warps=4, num_stages=2)


def expand_config(max_segment_tokens: int, rank: int, max_out_features: int) -> ExpandConfig:
    block_k = padded_rank(rank)
    if max_segment_tokens <= 16:
        block_m, block_n = 16, 128
    elif max_segment_tokens <= 64:
        block_m, block_n = 32, 128
    else:
        block_m, block_n = 64, 128
    if block_k >= 128:
        block_n = 64
    block_n = min(block_n, max(MIN_DOT_BLOCK, 1 << (max_out_features - 1).bit_length()))
    return ExpandConfig(block_m, block_n, block_k, num_warps=4, num_stages=2)
