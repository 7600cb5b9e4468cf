"""Per-request merging: each strategy against values worked out by hand on small tensors, the
recipe validation a request goes through, and the adapters that cannot be merged."""

from __future__ import annotations

import pytest
import torch

from lorax_mlflow.adapters.merge import MergeSpec, merge_adapters
from lorax_mlflow.lora.weights import LoraWeights
from lorax_mlflow.errors import AdapterValidationError, InvalidRequestError

MODULE = "model.layers.0.self_attn.q_proj"


def adapter(name: str, a: list, b: list | None = None, module: str = MODULE) -> LoraWeights:
    """One-module adapter; A holds the values under test, B defaults to A's transpose."""
    a_tensor = torch.tensor(a, dtype=torch.float32)
    b_tensor = torch.tensor(b, dtype=torch.float32) if b is not None else a_tensor.T.clone()
    return LoraWeights(name=name, rank=a_tensor.shape[0], a={module: a_tensor}, b={module: b_tensor})


def merged_a(adapters: list[LoraWeights], seed: int = 0, **recipe) -> torch.Tensor:
    spec = MergeSpec.from_dict({"ids": [a.name for a in adapters], **recipe})
    return merge_adapters(adapters, spec, seed=seed).a[MODULE]


# Three task tensors, one row each, chosen so that every sign-election rule shows up.
T1 = [[1.0, -2.0, 3.0, 0.0, 0.0]]
T2 = [[2.0, 1.0, -1.0, 0.0, 0.0]]
T3 = [[-4.0, 1.0, -1.0, 5.0, 0.0]]
THREE = [adapter("t1", T1), adapter("t2", T2), adapter("t3", T3)]


def test_linear_is_the_weighted_sum_of_a_and_of_b_separately():
    x = adapter("x", [[1.0, 2.0]], [[3.0], [4.0]])
    y = adapter("y", [[-1.0, 0.5]], [[1.0], [-2.0]])

    merged = merge_adapters([x, y], MergeSpec(ids=("x", "y"), weights=(0.25, 2.0)))

    torch.testing.assert_close(merged.a[MODULE], torch.tensor([[0.25 - 2.0, 0.5 + 1.0]]))
    torch.testing.assert_close(merged.b[MODULE], torch.tensor([[0.75 + 2.0], [1.0 - 4.0]]))
    assert merged.rank == 1 and merged.name == MergeSpec(ids=("x", "y"), weights=(0.25, 2.0)).recipe_key()


def test_linear_without_weights_sums_with_weight_one():
    torch.testing.assert_close(merged_a(THREE), torch.tensor([[-1.0, 0.0, 1.0, 5.0, 0.0]]))


def test_ties_total_elects_the_sign_of_the_summed_values():
    # column sums -1, 0 (tie -> +), 1, 5, 0 (tie -> +); average of the entries with the elected sign,
    # zeros never vote and an all-zero column stays zero.
    expected = [[-4.0, (1.0 + 1.0) / 2, 3.0, 5.0, 0.0]]
    torch.testing.assert_close(merged_a(THREE, merge_strategy="ties"), torch.tensor(expected))


def test_ties_frequency_elects_the_sign_most_tensors_have():
    # sign counts: +2/-1, +2/-1, +1/-2, one +, none
    expected = [[(1.0 + 2.0) / 2, (1.0 + 1.0) / 2, (-1.0 - 1.0) / 2, 5.0, 0.0]]
    got = merged_a(THREE, merge_strategy="ties", majority_sign_method="frequency")
    torch.testing.assert_close(got, torch.tensor(expected))


def test_ties_elects_the_sign_before_weighting():
    # With weights the total vote of column 0 would be 0.5*1 + 3*2 - 4 > 0; unweighted it is -1 < 0.
    expected = [[-4.0, (3.0 * 1.0 + 1.0 * 1.0) / 2, 0.5 * 3.0, 5.0, 0.0]]
    got = merged_a(THREE, merge_strategy="ties", weights=[0.5, 3.0, 1.0])
    torch.testing.assert_close(got, torch.tensor(expected))


def test_ties_frequency_tie_goes_to_plus():
    pair = [adapter("p", [[1.0]]), adapter("n", [[-3.0]])]
    assert merged_a(pair, merge_strategy="ties", majority_sign_method="frequency").item() == 1.0
    assert merged_a(pair, merge_strategy="ties", majority_sign_method="total").item() == -3.0


@pytest.mark.parametrize("density,kept", [(0.3, [9.0, -8.0, 7.0]), (0.25, [9.0, -8.0]), (0.05, [])])
def test_ties_keeps_the_largest_magnitudes(density, kept):
    values = [[0.5, -8.0, 1.0, 7.0, -2.0, 3.0, 9.0, -4.0, 5.0, 6.0]]  # 10 entries, int(density*10) kept
    got = merged_a([adapter("only", values)], merge_strategy="ties", density=density)[0]
    assert sorted(got[got != 0].tolist()) == sorted(kept)
    assert torch.equal(got != 0, torch.tensor([v in kept for v in values[0]]))


def test_ties_trims_before_electing_the_sign():
    # Untrimmed, column 0 would vote -5 + 3 + 3 > 0 and give 3. Trimmed to one entry per tensor,
    # only the column-1 values survive, so column 0 is empty.
    x = adapter("x", [[-5.0, 9.0]])
    y = adapter("y", [[3.0, 4.0]])
    z = adapter("z", [[3.0, 4.0]])
    got = merged_a([x, y, z], merge_strategy="ties", density=0.5)
    torch.testing.assert_close(got, torch.tensor([[0.0, (9.0 + 4.0 + 4.0) / 3]]))


def large(name: str, value: float) -> LoraWeights:
    return adapter(name, torch.full((8, 500), value).tolist())


@pytest.mark.parametrize("density", [0.2, 0.7])
def test_dare_linear_drops_about_1_minus_density_and_rescales(density):
    got = merged_a([large("x", 1.0)], merge_strategy="dare_linear", density=density)
    kept = got[got != 0]
    assert abs(kept.numel() / got.numel() - density) < 0.03  # 4000 draws: > 6 standard deviations
    torch.testing.assert_close(kept, torch.full_like(kept, 1.0 / density))


def test_dare_linear_each_entry_is_a_rescaled_subset_sum():
    x, y = large("x", 1.0), large("y", 10.0)
    got = merged_a([x, y], merge_strategy="dare_linear", density=0.5, weights=[2.0, 1.0])
    outcomes = {0.0: 0.25, 4.0: 0.25, 20.0: 0.25, 24.0: 0.25}  # none, x only, y only, both; each ~1/4
    for value, share in outcomes.items():
        assert abs((got == value).float().mean().item() - share) < 0.04
    assert sum((got == value).sum().item() for value in outcomes) == got.numel()


def test_dare_ties_averages_the_surviving_agreeing_entries():
    x, y = large("x", 1.0), large("y", -3.0)
    got = merged_a([x, y], merge_strategy="dare_ties", density=0.5)
    # After rescaling by 2: x entries are 2, y entries -6; total vote picks y's sign where y survived.
    outcomes = {0.0: 0.25, 2.0: 0.25, -6.0: 0.5}
    for value, share in outcomes.items():
        assert abs((got == value).float().mean().item() - share) < 0.04
    assert sum((got == value).sum().item() for value in outcomes) == got.numel()


@pytest.mark.parametrize("dare,plain", [("dare_linear", "linear"), ("dare_ties", "ties")])
def test_dare_at_full_density_is_the_plain_strategy(dare, plain):
    torch.testing.assert_close(merged_a(THREE, merge_strategy=dare), merged_a(THREE, merge_strategy=plain))


def test_dare_is_reproducible_for_a_seed():
    pair = [large("x", 1.0), large("y", 2.0)]
    first = merged_a(pair, merge_strategy="dare_ties", density=0.4, seed=7)
    assert torch.equal(first, merged_a(pair, merge_strategy="dare_ties", density=0.4, seed=7))
    assert not torch.equal(first, merged_a(pair, merge_strategy="dare_ties", density=0.4, seed=8))


def test_merge_keeps_the_adapters_dtype():
    ones = torch.ones(1, 4, dtype=torch.bfloat16)
    x = LoraWeights("x", 1, {MODULE: ones}, {MODULE: ones.T.clone()})
    merged = merge_adapters([x, x], MergeSpec(ids=("x", "x"), merge_strategy="ties"))
    assert merged.a[MODULE].dtype == merged.b[MODULE].dtype == torch.bfloat16


# --- what cannot be merged ------------------------------------------------------------------------


def test_adapters_covering_different_modules_cannot_merge():
    x = adapter("x", [[1.0, 2.0]])
    y = adapter("y", [[1.0, 2.0]], module="model.layers.0.self_attn.v_proj")
    with pytest.raises(AdapterValidationError, match="cover different modules"):
        merge_adapters([x, y], MergeSpec(ids=("x", "y")))


def test_adapters_of_different_ranks_cannot_merge():
    x = adapter("x", [[1.0, 2.0]])
    y = adapter("y", [[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(AdapterValidationError, match=r"different ranks at .*q_proj \(1 vs 2\)"):
        merge_adapters([x, y], MergeSpec(ids=("x", "y")))


@pytest.mark.parametrize(
    "recipe,param",
    [
        ({}, "ids"),
        ({"ids": []}, "ids"),
        ({"ids": "org/x"}, "ids"),
        ({"ids": ["org/x", ""]}, "ids"),
        ({"ids": ["a", "b"], "weights": [1.0]}, "weights"),
        ({"ids": ["a", "b"], "weights": [1.0, "2"]}, "weights"),
        ({"ids": ["a", "b"], "weights": [1.0, float("nan")]}, "weights"),
        ({"ids": ["a"], "merge_strategy": "slerp"}, "merge_strategy"),
        ({"ids": ["a"], "density": 0}, "density"),
        ({"ids": ["a"], "density": 1.5}, "density"),
        ({"ids": ["a"], "density": True}, "density"),
        ({"ids": ["a"], "majority_sign_method": "median"}, "majority_sign_method"),
        ({"ids": ["a"], "temperature": 1.0}, "temperature"),
    ],
)
def test_invalid_recipes_name_the_field(recipe, param):
    with pytest.raises(InvalidRequestError) as info:
        MergeSpec.from_dict(recipe)
    assert info.value.param == f"merged_adapters.{param}"
    assert info.value.status == 400


def test_valid_recipe_is_parsed_with_lorax_defaults():
    assert MergeSpec.from_dict({"ids": ["org/a", "org/b"]}) == MergeSpec(ids=("org/a", "org/b"))
    spec = MergeSpec.from_dict(
        {"ids": ["a", "b"], "weights": [1, 0.5], "merge_strategy": "dare_ties", "density": 0.3,
         "majority_sign_method": "frequency"}
    )
    assert spec == MergeSpec(("a", "b"), (1.0, 0.5), "dare_ties", 0.3, "frequency")


def test_recipe_key_identifies_what_the_merge_computes():
    key = MergeSpec(("a", "b")).recipe_key()
    assert key == MergeSpec(("a", "b"), weights=(1.0, 1.0)).recipe_key()
    assert key == MergeSpec(("a", "b"), density=0.5, majority_sign_method="frequency").recipe_key()  # unused by linear
    assert len({
        key,
        MergeSpec(("b", "a")).recipe_key(),
        MergeSpec(("a", "b"), weights=(1.0, 2.0)).recipe_key(),
        MergeSpec(("a", "b"), merge_strategy="ties").recipe_key(),
        MergeSpec(("a", "b"), merge_strategy="ties", density=0.5).recipe_key(),
        MergeSpec(("a", "b"), merge_strategy="ties", majority_sign_method="frequency").recipe_key(),
        MergeSpec(("a", "b"), merge_strategy="dare_linear", density=0.5).recipe_key(),
    }) == 7
