"""lorax_kernels: batch grouping, the torch path and dispatch, checked against the float64
per-token references in kernels/reference.py.

The Triton kernels are tested in tests/test_kernels_triton.py. On a machine without CUDA they run
in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before the kernels are
first defined; `test_triton_kernels_under_interpreter` below therefore runs that module in a fresh
Python process, so nothing imported earlier in this pytest process can interfere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lorax_kernels import BACKEND_ENV_VAR, add_lora, lora_expand, lora_shrink, make_lora_meta, resolve_backend
from lorax_kernels.reference import reference_add_lora, reference_expand, reference_shrink

REPO_ROOT = Path(__file__).resolve().parent.parent

# Largest |got - ref| allowed, relative to max(1, max |ref|). fp16/bf16 y is rounded once at the end.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class KernelCase:
    """One batch: token -> slot map, weight shapes, and the true rank of each slot (<= rank)."""

    name: str
    token_lora: tuple[int, ...]
    num_slots: int
    in_features: int
    out_features: tuple[int, ...]  # one entry per slice, packed side by side in y
    rank: int
    slot_ranks: tuple[int, ...] | None = None  # None: every slot uses the full rank
    buffer_rank: int | None = None  # weights are rank slices [:, :rank] of buffers this wide (as MultiLoraLinear passes)


def _random_slots(num_tokens: int, num_slots: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(-1, num_slots, (num_tokens,), generator=generator).tolist())


KERNEL_CASES = [
    KernelCase("mixed_random", _random_slots(13, 4, seed=1), 4, 72, (40,), 8),
    KernelCase("non_power_of_two_hidden", _random_slots(11, 3, seed=2), 3, 100, (70,), 16),
    KernelCase("empty_segments", (4, 1, 4, 4, 1, 1, 4), 6, 48, (36,), 8),
    KernelCase("all_tokens_one_adapter", (2,) * 9, 3, 64, (48,), 16),
    KernelCase("every_token_a_different_adapter", (7, 3, 0, 5, 1, 6, 2, 4), 8, 40, (24,), 8),
    KernelCase("no_adapter_tokens_interleaved", (-1, 0, -1, -1, 1, 0, -1, 1, -1), 2, 56, (32,), 8),
    KernelCase("requests_not_contiguous", (1, 1, 0, 0, 1, 1, 2, 0), 3, 32, (32,), 8),
    KernelCase("rank_padding", _random_slots(12, 4, seed=3), 4, 48, (40,), 16, slot_ranks=(4, 16, 1, 8)),
    KernelCase("rank_4", _random_slots(9, 3, seed=4), 3, 40, (24,), 4),
    KernelCase("rank_128", _random_slots(6, 2, seed=5), 2, 40, (24,), 128),
    KernelCase("slices_of_different_widths", _random_slots(10, 3, seed=6), 3, 64, (48, 16, 16), 8),
    KernelCase("split_k_over_long_input", _random_slots(7, 2, seed=7), 2, 520, (24,), 8),
    KernelCase("fixed_order_split_sum", _random_slots(7, 3, seed=10), 3, 2600, (24, 16), 8),  # > 1024 inputs: 3 splits
    KernelCase("long_segments", _random_slots(150, 3, seed=8), 3, 48, (40, 24), 16),
    KernelCase("rank_slice_of_wider_buffers", _random_slots(9, 3, seed=9), 3, 40, (24, 16), 8, buffer_rank=32),
    # Packed by slot as the runner packs a step, equally many tokens per adapter: the views path.
    KernelCase("slot_ordered_equal_segments", (-1, -1, 0, 0, 2, 2, 3, 3), 4, 64, (48,), 8, buffer_rank=16),
    KernelCase("slot_ordered_one_token_each", (0, 1, 2, 3, 4, 5, -1), 6, 48, (40, 16), 8),
]


@dataclass
class KernelInputs:
    token_lora: torch.Tensor
    x: torch.Tensor
    a_stacks: list[torch.Tensor]
    b_stacks: list[torch.Tensor]
    y: torch.Tensor


def make_inputs(case: KernelCase, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> KernelInputs:
    """Random operands of unit-ish scale; each slot's factors are zero beyond its own rank."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens, rank, in_features = len(case.token_lora), case.rank, case.in_features
    slot_ranks = case.slot_ranks or (rank,) * case.num_slots
    rank_mask = (torch.arange(rank)[None, :] < torch.tensor(slot_ranks)[:, None]).float()  # [slots, r]

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    x = randn(num_tokens, in_features, scale=1.0)
    a_stacks = [randn(case.num_slots, rank, in_features, scale=in_features**-0.5) * rank_mask[:, :, None] for _ in case.out_features]
    b_stacks = [randn(case.num_slots, out, rank, scale=rank**-0.5) * rank_mask[:, None, :] for out in case.out_features]
    y = randn(num_tokens, sum(case.out_features), scale=1.0)
    return KernelInputs(
        token_lora=torch.tensor(case.token_lora, dtype=torch.int64, device=device),
        x=x.to(device, dtype),
        a_stacks=[_as_rank_slice(a.to(device, dtype), 1, case.buffer_rank) for a in a_stacks],
        b_stacks=[_as_rank_slice(b.to(device, dtype), 2, case.buffer_rank) for b in b_stacks],
        y=y.to(device, dtype),
    )


def _as_rank_slice(stack: torch.Tensor, rank_dim: int, buffer_rank: int | None) -> torch.Tensor:
    """The same values, as a non-contiguous view of a wider zero-padded buffer when buffer_rank is set."""
    if buffer_rank is None:
        return stack
    shape = list(stack.shape)
    rank, shape[rank_dim] = shape[rank_dim], buffer_rank
    buffer = torch.full(shape, float("nan"), dtype=stack.dtype, device=stack.device)  # padding must never be read
    view = buffer.narrow(rank_dim, 0, rank)
    view.copy_(stack)
    assert not view.is_contiguous()
    return view


def assert_matches_reference(got: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    error = (got.detach().cpu().double() - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


def check_shrink_and_expand(case: KernelCase, dtype: torch.dtype, device: str, backend: str) -> None:
    """Shrink and expand through the public API against the float64 references, plus the exact
    guarantees: v is 0 and y bit-for-bit unchanged for tokens without an adapter."""
    inputs = make_inputs(case, dtype, device)
    meta = make_lora_meta(inputs.token_lora, case.num_slots)
    no_adapter = (inputs.token_lora < 0).cpu()

    v = lora_shrink(inputs.x, inputs.a_stacks, meta, backend=backend)
    assert v.shape == (len(case.out_features), len(case.token_lora), case.rank) and v.dtype == torch.float32
    reference_v = reference_shrink(inputs.x, inputs.a_stacks, inputs.token_lora)
    assert_matches_reference(v, reference_v, torch.float32 if dtype == torch.float32 else dtype)
    assert not v[:, no_adapter.to(v.device)].any()

    y = inputs.y.clone()
    lora_expand(v, inputs.b_stacks, meta, y, backend=backend)
    # Expand from the kernel's own v, so this checks expand alone.
    assert_matches_reference(y, reference_expand(v, inputs.b_stacks, inputs.token_lora, inputs.y), dtype)
    assert torch.equal(y[no_adapter.to(y.device)], inputs.y[no_adapter.to(y.device)])


def check_add_lora(case: KernelCase, dtype: torch.dtype, device: str, backend: str) -> None:
    inputs = make_inputs(case, dtype, device)
    meta = make_lora_meta(inputs.token_lora, case.num_slots)
    y = inputs.y.clone()
    add_lora(y, inputs.x, inputs.a_stacks[0], inputs.b_stacks[0], meta, backend=backend)
    expected = reference_add_lora(inputs.y, inputs.x, inputs.a_stacks[0], inputs.b_stacks[0], inputs.token_lora)
    assert_matches_reference(y, expected, dtype)


# --- grouping ---------------------------------------------------------------------------------


def test_meta_groups_tokens_by_slot_stably_and_skips_tokens_without_adapter():
    meta = make_lora_meta(torch.tensor([2, -1, 0, 2, 1, 0]), num_slots=4)
    assert meta.sorted_token_indices.tolist() == [2, 5, 4, 0, 3]
    assert meta.segment_slots.tolist() == [0, 1, 2]  # slot 3 has no tokens: no segment
    assert meta.segment_starts.tolist() == [0, 2, 3]
    assert meta.segment_counts.tolist() == [2, 1, 2]
    assert meta.segment_slots_host == (0, 1, 2) and meta.segment_counts_host == (2, 1, 2)
    assert meta.segment_first_tokens == (-1, 4, -1)  # only slot 1's tokens form one run
    assert meta.max_segment_tokens == 2 and meta.num_tokens == 6


def test_meta_marks_contiguous_requests():
    meta = make_lora_meta(torch.tensor([1, 1, 1, -1, 0, 0]), num_slots=2)
    assert meta.segment_first_tokens == (4, 0)


def test_meta_lists_the_runs_of_consecutive_rows_with_one_slot():
    assert make_lora_meta([-1, -1, 0, 0, 3, 3, 5, 5], num_slots=6).runs == ((2, 2, 0), (4, 2, 3), (6, 2, 5))
    assert make_lora_meta([0, 0, -1, 1, 1], num_slots=2).runs == ((0, 2, 0), (3, 2, 1))
    assert make_lora_meta([0, 1, 0, 1], num_slots=2).runs == ((0, 1, 0), (1, 1, 1), (2, 1, 0), (3, 1, 1))


def test_meta_is_none_when_no_token_has_an_adapter():
    assert make_lora_meta(torch.tensor([-1, -1, -1]), num_slots=4) is None
    assert make_lora_meta(torch.zeros(0, dtype=torch.int64), num_slots=4) is None


def test_meta_index_tensors_go_to_the_requested_device():
    meta = make_lora_meta(torch.tensor([0, 1]), num_slots=2, device="meta")
    assert meta.sorted_token_indices.device.type == "meta" and meta.segment_counts_host == (1, 1)


def test_meta_from_a_host_list_matches_the_tensor_form_and_maps_tokens_to_sorted_positions():
    """The engine passes the Python slot list it built the step from: nothing is copied back."""
    from_list = make_lora_meta([2, -1, 0, 2, 1, 0], num_slots=4)
    from_tensor = make_lora_meta(torch.tensor([2, -1, 0, 2, 1, 0]), num_slots=4)
    for name in ("sorted_token_indices", "segment_slots", "segment_starts", "segment_counts", "token_positions"):
        assert torch.equal(getattr(from_list, name), getattr(from_tensor, name)), name
    assert from_list.token_positions.tolist() == [3, -1, 0, 4, 2, 1]  # sorted order: tokens 2, 5, 4, 0, 3
    assert make_lora_meta([-1, -1], num_slots=4) is None


@pytest.mark.parametrize("token_lora", [[0, 4], [-2, 0]])
def test_meta_rejects_slots_out_of_range(token_lora):
    with pytest.raises(ValueError, match="token_lora values"):
        make_lora_meta(torch.tensor(token_lora), num_slots=4)


def test_meta_rejects_non_integer_or_batched_maps():
    with pytest.raises(ValueError, match="integer"):
        make_lora_meta(torch.tensor([0.0, 1.0]), num_slots=2)
    with pytest.raises(ValueError, match="1-D"):
        make_lora_meta(torch.zeros(2, 2, dtype=torch.int64), num_slots=2)


def test_deterministic_shrink_splits_by_shape_only_and_keeps_token_blocks_small():
    """What batch invariance rests on: the K split and K block follow (in_features, dtype) alone,
    and token blocks stay on the 16/32-row instructions, whatever the step's segments and rank."""
    from lorax_kernels.configs import expand_config, shrink_config

    batches = [[1], [3, 1, 1], [70, 12, 4], [2048]]
    for in_features in (4096, 14336):
        configs = [shrink_config(b, slices, rank, in_features, 2) for b in batches for slices in (1, 3) for rank in (8, 64)]
        assert len({(c.block_k, c.split_k, c.k_per_split) for c in configs}) == 1
        assert all(not c.atomic and c.block_m <= 32 for c in configs)
    assert shrink_config([1], 1, 16, 14336, 2).split_k == 14 and shrink_config([1], 1, 16, 4096, 2).split_k == 4
    assert all(expand_config(tokens, 16, 4096).block_m <= 32 for tokens in (1, 70, 2048))


# --- torch path -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: case.name)
def test_torch_path_matches_reference(case, dtype):
    check_shrink_and_expand(case, dtype, device="cpu", backend="torch")


ADD_LORA_CASES = [case for case in KERNEL_CASES if len(case.out_features) == 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ADD_LORA_CASES, ids=lambda case: case.name)
def test_torch_add_lora_matches_reference(case, dtype):
    check_add_lora(case, dtype, device="cpu", backend="torch")


def test_without_meta_shrink_is_zero_and_y_is_untouched():
    inputs = make_inputs(KERNEL_CASES[0], torch.float32)
    v = lora_shrink(inputs.x, inputs.a_stacks, None)
    assert v.shape == (1, len(inputs.token_lora), KERNEL_CASES[0].rank) and not v.any()
    y = inputs.y.clone()
    lora_expand(torch.ones_like(v), inputs.b_stacks, None, y)
    add_lora(y, inputs.x, inputs.a_stacks[0], inputs.b_stacks[0], None)
    assert torch.equal(y, inputs.y)


def test_shape_mismatches_are_reported():
    inputs = make_inputs(KERNEL_CASES[10], torch.float32)  # three slices
    meta = make_lora_meta(inputs.token_lora, 3)
    v = lora_shrink(inputs.x, inputs.a_stacks, meta)
    with pytest.raises(ValueError, match="slice widths"):
        lora_expand(v[:2], inputs.b_stacks[:2], meta, inputs.y.clone())
    with pytest.raises(ValueError, match="tokens"):
        lora_shrink(inputs.x[:-1], inputs.a_stacks, meta)


# --- dispatch ---------------------------------------------------------------------------------


def test_cpu_tensors_use_the_torch_path_by_default(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend(torch.zeros(1)) == "torch"


def test_backend_can_be_forced_by_environment_or_argument(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    assert resolve_backend(torch.zeros(1)) == "triton"
    assert resolve_backend(torch.zeros(1), backend="torch") == "torch"
    with pytest.raises(ValueError, match="unknown LoRA kernel backend"):
        resolve_backend(torch.zeros(1), backend="cutlass")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_use_triton_by_default(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend(torch.zeros(1, device="cuda")) == "triton"


# --- Triton kernels in the interpreter --------------------------------------------------------


def test_triton_kernels_under_interpreter():
    """Runs tests/test_kernels_triton.py on CPU tensors with TRITON_INTERPRET=1 in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop(BACKEND_ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "tests/test_kernels_triton.py"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_cpu_plan_batches_short_runs_and_gives_long_runs_their_own_gemms():
    from lorax_kernels.run_plan import plan_runs

    rank, d_in, d_out = 16, 576, 576
    decode = make_lora_meta([0, 0, 1, 1, 2, 2, 3, 3], 8)  # a decode step packed by slot: views, no padding
    plan = plan_runs(decode, rank, d_in, d_out)
    assert plan.singles == () and plan.batched.rows == slice(0, 8) and plan.batched.slots == (0, 1, 2, 3)

    # 16 decodes of 8 adapters, then a 128-token prefill chunk of adapter 0: the chunk is not padded with
    # the decodes (nor are the decodes padded to its length), it runs alone on slices
    mixed = make_lora_meta([s for s in range(8) for _ in range(2)] + [0] * 128, 8)
    plan = plan_runs(mixed, rank, d_in, d_out)
    assert plan.singles == ((16, 144, 0),) and plan.batched.rows == slice(0, 16)

    uneven = make_lora_meta([5, 1, 2, 3, 4, 5, 6, 7, -1, 3, 3, 1], 8)  # short runs of unequal length: padded
    plan = plan_runs(uneven, rank, d_in, d_out)
    assert plan.singles == () and plan.batched.rows is None and plan.batched.width == 2
    assert plan_runs(uneven, rank, d_in, d_out) is plan  # planned once per step and layer shape

    long_and_short = make_lora_meta([1] * 4000 + [2], 8)
    assert plan_runs(long_and_short, rank, d_in, d_out).batched is None  # padding 3,999 rows would cost more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "token_lora",
    [
        [5, 1, 2, 3, 4, 5, 6, 7, -1, 3, 3, 1],  # short runs of unequal length, a gap: padded batch
        [0, 0, 1, 1, 2, 2, 3, 3],  # one block of equal runs of slots 0..3: views of the stacks
        [4, 4, 6, 6, 1, 1] + [4] * 1000 + [-1, 6, 6, 6, 6, 6],  # decodes, a long chunk alone, a short one batched
        [1] * 300 + [2],  # every run alone
    ],
)
def test_cpu_run_plans_match_the_float64_reference(token_lora, dtype):
    torch.manual_seed(0)
    slots, rank, d_in, d_out = 8, 16, 96, 160
    token_lora = torch.tensor(token_lora)
    meta = make_lora_meta(token_lora, slots)
    buffer_a = torch.randn(slots, 32, d_in, dtype=dtype)
    buffer_b = torch.randn(slots, d_out, 32, dtype=dtype)
    a, b = buffer_a[:, :rank], buffer_b[:, :, :rank]  # rank slices of wider slot buffers, as the layers pass
    x = torch.randn(len(token_lora), d_in, dtype=dtype)
    y = torch.randn(len(token_lora), d_out, dtype=dtype)
    got = y.clone()
    add_lora(got, x, a, b, meta)
    assert_matches_reference(got, reference_add_lora(y, x, a, b, token_lora), dtype)