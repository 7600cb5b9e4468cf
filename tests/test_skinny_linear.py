"""The decode-sized linear (``(W @ x.T).T`` on several CPU threads) computes what ``F.linear`` does."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorax_kernels.skinny_linear import SKINNY_MAX_ROWS, SkinnyLinear, linear, use_skinny_linears


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 3, 16, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 200])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_a_float64_reference_at_every_row_count(two_threads, rows, with_bias):
    torch.manual_seed(rows)
    x = torch.randn(1, rows, 96)
    weight = torch.randn(160, 96)
    bias = torch.randn(160) if with_bias else None
    y = linear(x, weight, bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert y.shape == (1, rows, 160) and y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4)


def test_single_thread_and_large_inputs_take_plain_linear(two_threads):
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    torch.set_num_threads(1)
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_swapping_keeps_parameters_shared_so_tied_weights_stay_tied():
    embedding = nn.Embedding(50, 12)
    model = nn.ModuleDict({"embed": embedding, "proj": nn.Linear(12, 12), "head": nn.Linear(12, 50, bias=False)})
    model["head"].weight = embedding.weight
    assert use_skinny_linears(model) == 2
    assert isinstance(model["head"], SkinnyLinear) and isinstance(model["proj"], SkinnyLinear)
    assert model["head"].weight is embedding.weight
    hidden = torch.randn(5, 12)
    torch.testing.assert_close(model["head"](hidden), hidden @ embedding.weight.T)
    assert use_skinny_linears(model) == 0  # already swapped
