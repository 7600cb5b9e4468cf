"""Block sizes for the Triton kernels, from a small table keyed by shape.

Chosen by rule instead of `triton.autotune`, so a launch never benchmarks at run time (tests and
the first request stay fast and deterministic). Keys: tokens per segment (bucketed), rank, and
in_features (shrink) or widest output slice (expand). The values follow the usual shape of such
tables (SGMV/punica, vLLM's LoRA defaults): tiny token blocks and deep split-K for decode, larger
token blocks as segments grow. Re-tune on the target GPU with benchmarks/kernels.py.
"""

from __future__ import annotations

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


def shrink_config(max_segment_tokens: int, rank: int, in_features: int) -> ShrinkConfig:
    block_n = padded_rank(rank)
    if max_segment_tokens <= 16:
        block_m, block_k, num_warps = 16, 256, 4
    elif max_segment_tokens <= 64:
        block_m, block_k, num_warps = 32, 128, 4
    else:
        block_m, block_k, num_warps = 64, 64, 4
    if block_n >= 64:  # keep the [block_k, block_n] A tile in registers
        block_k = min(block_k, 64)
    block_k = min(block_k, max(MIN_DOT_BLOCK, 1 << (in_features - 1).bit_length()))
    k_blocks = -(-in_features // block_k)
    # Few tokens: split the reduction over `in` so enough programs stream A and x in parallel.
    target_splits = 32 if max_segment_tokens <= 16 else 8 if max_segment_tokens <= 256 else 1
    split_k = max(1, min(target_splits, k_blocks))
    return ShrinkConfig(block_m, block_n, block_k, split_k, num_warps, num_stages=2)


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
