"""The batched sampler against references computed independently, row by row, in plain Python."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from scipy.stats import chi2

from lorax_mlflow.engine.sampler import Sampler
from lorax_mlflow.engine.sampling_params import SamplingParams

VOCAB = 12
EOS = {2, 9}
# distinct values in no particular order, so "sorted" and "by id" differ
LOGITS = [0.7, -1.0, 2.0, -0.2, 1.5, -3.0, 0.3, 1.0, -1.5, 0.0, -0.5, -2.0]


@dataclass
class Row:
    params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: object = None


def make_row(prompt=(), output=(), **params) -> Row:
    p = SamplingParams(**params)
    generator = None
    if p.seed is not None:
        generator = torch.Generator().manual_seed(p.seed)
    return Row(p, list(prompt), list(output), generator)


def probabilities(row: Row, logits=LOGITS) -> list[float]:
    return Sampler(VOCAB, EOS).probabilities(torch.tensor([logits]), [row])[0].tolist()


def softmax_over(logits: list[float], kept: set[int]) -> list[float]:
    weights = [math.exp(x) if i in kept else 0.0 for i, x in enumerate(logits)]
    total = sum(weights)
    return [w / total for w in weights]


# ---- independent per-row references for the truncation filters --------------------------------


def ref_top_k(probs: list[float], k: int) -> set[int]:
    return set(sorted(range(len(probs)), key=lambda i: -probs[i])[:k])


def ref_top_p(probs: list[float], p: float) -> set[int]:
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


def ref_min_p(probs: list[float], min_p: float) -> set[int]:
    return {i for i, q in enumerate(probs) if q >= min_p * max(probs)}


def ref_typical(probs: list[float], mass: float) -> set[int]:
    entropy = -sum(q * math.log(q) for q in probs if q > 0)
    distance = {i: abs(-math.log(q) - entropy) for i, q in enumerate(probs) if q > 0}
    kept, total = set(), 0.0
    for i in sorted(distance, key=distance.get):
        kept.add(i)
        total += probs[i]
        if total >= mass:
            break
    return kept


def support(probs: list[float]) -> set[int]:
    return {i for i, q in enumerate(probs) if q > 0}


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_temperature_scales_the_distribution(temperature):
    expected = softmax_over([x / temperature for x in LOGITS], set(range(VOCAB)))
    assert probabilities(make_row(temperature=temperature)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("name", "value", "reference"),
    [
        ("top_k", 1, ref_top_k),
        ("top_k", 3, ref_top_k),
        ("top_k", 11, ref_top_k),
        ("top_p", 0.3, ref_top_p),
        ("top_p", 0.75, ref_top_p),
        ("top_p", 0.95, ref_top_p),
        ("min_p", 0.05, ref_min_p),
        ("min_p", 0.4, ref_min_p),
        ("typical_p", 0.2, ref_typical),
        ("typical_p", 0.5, ref_typical),
        ("typical_p", 0.9, ref_typical),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_each_filter_keeps_exactly_the_reference_set(name, value, reference, temperature):
    scaled = [x / temperature for x in LOGITS]
    kept = reference(softmax_over(scaled, set(range(VOCAB))), value)
    probs = probabilities(make_row(temperature=temperature, **{name: value}))
    assert support(probs) == kept
    assert probs == pytest.approx(softmax_over(scaled, kept), abs=1e-6)


def test_filters_chain_on_renormalised_survivors():
    """top_k, then top_p on the top-k renormalised distribution, then min_p, then typical_p."""
    everything = set(range(VOCAB))
    kept = ref_top_k(softmax_over(LOGITS, everything), 6)
    kept &= ref_top_p(softmax_over(LOGITS, kept), 0.9)
    kept &= ref_min_p(softmax_over(LOGITS, kept), 0.1)
    kept &= ref_typical(softmax_over(LOGITS, kept), 0.8)
    probs = probabilities(make_row(top_k=6, top_p=0.9, min_p=0.1, typical_p=0.8))
    assert 1 < len(kept) < 6
    assert support(probs) == kept
    assert probs == pytest.approx(softmax_over(LOGITS, kept), abs=1e-6)


def penalised_reference(logits, prompt, output, repetition=1.0, presence=0.0, frequency=0.0):
    expected = list(logits)
    for tok in set(prompt) | set(output):
        expected[tok] = expected[tok] / repetition if expected[tok] > 0 else expected[tok] * repetition
    for tok in set(output):
        expected[tok] -= presence + frequency * output.count(tok)
    return expected


PROMPT = [1, 3, 3, 7]  # 1 and 3 have negative logits, 7 positive
OUTPUT = [4, 4, 4, 6, 10]  # 4 and 6 positive, 10 negative


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.5},
        {"repetition_penalty": 0.7},
        {"presence_penalty": 0.8},
        {"frequency_penalty": 0.4},
        {"presence_penalty": -0.5, "frequency_penalty": 1.1},
        {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.2},
    ],
)
def test_penalties_hit_exactly_the_right_tokens(penalties):
    """Repetition counts prompt and output tokens; presence and frequency only output tokens."""
    expected = penalised_reference(
        LOGITS,
        PROMPT,
        OUTPUT,
        penalties.get("repetition_penalty", 1.0),
        penalties.get("presence_penalty", 0.0),
        penalties.get("frequency_penalty", 0.0),
    )
    probs = probabilities(make_row(PROMPT, OUTPUT, **penalties))
    assert probs == pytest.approx(softmax_over(expected, set(range(VOCAB))), abs=1e-6)


def test_penalties_on_shared_tokens_use_each_rows_own_values_and_lists():
    """The same token seen by several rows is penalised per row; ids outside the vocabulary are ignored."""
    settings = [
        {"repetition_penalty": 1.5},
        {"presence_penalty": 0.8, "frequency_penalty": 0.4},
        {},
        {"repetition_penalty": 0.7, "frequency_penalty": -0.3},
    ]
    lists = [(PROMPT, OUTPUT), (OUTPUT, PROMPT), (PROMPT, OUTPUT), (PROMPT[::-1], OUTPUT + [7, 7])]
    rows = [make_row([*prompt, VOCAB, VOCAB + 5], output, **kw) for (prompt, output), kw in zip(lists, settings)]
    batched = Sampler(VOCAB, EOS).probabilities(torch.tensor([LOGITS] * len(rows)), rows)
    for probs, (prompt, output), kw in zip(batched.tolist(), lists, settings):
        expected = penalised_reference(
            LOGITS,
            prompt,
            output,
            kw.get("repetition_penalty", 1.0),
            kw.get("presence_penalty", 0.0),
            kw.get("frequency_penalty", 0.0),
        )
        assert probs == pytest.approx(softmax_over(expected, set(range(VOCAB))), abs=1e-6)


def test_logit_bias_is_added_before_greedy_choice():
    bias = {0: 5.0, 2: -100.0}
    expected = [x + bias.get(i, 0.0) for i, x in enumerate(LOGITS)]
    assert probabilities(make_row(logit_bias=bias)) == pytest.approx(softmax_over(expected, set(range(VOCAB))))
    out = Sampler(VOCAB, EOS)(torch.tensor([LOGITS]), [make_row(temperature=0.0, logit_bias=bias)])
    assert out.token_ids.tolist() == [0]


def test_ignore_eos_masks_every_eos_id():
    probs = probabilities(make_row(ignore_eos=True))
    assert support(probs) == set(range(VOCAB)) - EOS
    sampler = Sampler(VOCAB, EOS)
    greedy_rows = [make_row(temperature=0.0), make_row(temperature=0.0, ignore_eos=True)]
    out = sampler(torch.tensor([LOGITS, LOGITS]), greedy_rows)
    assert out.token_ids.tolist() == [2, 4]  # 2 (an eos) is the argmax; 4 is the best non-eos


def test_row_with_everything_masked_falls_back_to_raw_argmax():
    logits = torch.full((1, VOCAB), float("-inf"))
    logits[0, 9] = 1.0
    out = Sampler(VOCAB, EOS)(logits, [make_row(ignore_eos=True, seed=3)])
    assert out.token_ids.tolist() == [9]


def test_batched_rows_match_each_row_alone():
    """Per-row parameters are vectorised: a mixed batch gives each row what it gets alone."""
    rows = [
        make_row(PROMPT, OUTPUT, repetition_penalty=1.4, top_k=5),
        make_row(temperature=0.0, logit_bias={5: 100.0}),
        make_row(PROMPT, OUTPUT, frequency_penalty=0.7, top_p=0.8, temperature=0.7),
        make_row(ignore_eos=True, min_p=0.2, typical_p=0.9),
        make_row(),
    ]
    logits = torch.tensor([LOGITS, LOGITS[::-1], LOGITS[3:] + LOGITS[:3], LOGITS, LOGITS[::-1]])
    sampler = Sampler(VOCAB, EOS)
    batched = sampler.probabilities(logits, rows)
    for i, row in enumerate(rows):
        alone = sampler.probabilities(logits[i : i + 1], [row])
        torch.testing.assert_close(batched[i : i + 1], alone)


def test_top_k_candidates_give_the_distribution_of_the_sorted_vocabulary():
    """Rows that all have a top_k are truncated among the top-k_max tokens; a row without one makes
    the batch sort the whole vocabulary. Both give each row the reference distribution."""
    vocab = 2000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(5)) * 3
    filters = [
        {"top_k": 40, "top_p": 0.8, "temperature": 0.7},
        {"top_k": 200, "min_p": 0.05, "typical_p": 0.9},
    ]
    rows = [make_row(**kw) for kw in filters]
    sampler = Sampler(vocab, set())
    top_k_only = sampler.probabilities(logits[:2], rows)
    with_sorted_vocabulary = sampler.probabilities(logits, [*rows, make_row(top_p=0.9)])[:2]
    torch.testing.assert_close(top_k_only, with_sorted_vocabulary)
    for probs, row_logits, kw in zip(top_k_only.tolist(), logits.tolist(), filters):
        scaled = [x / kw.get("temperature", 1.0) for x in row_logits]
        kept = ref_top_k(softmax_over(scaled, set(range(vocab))), kw["top_k"])
        for name, reference in [("top_p", ref_top_p), ("min_p", ref_min_p), ("typical_p", ref_typical)]:
            if name in kw:
                kept &= reference(softmax_over(scaled, kept), kw[name])
        assert support(probs) == kept
        assert probs == pytest.approx(softmax_over(scaled, kept), abs=1e-6)


def test_padded_vocabulary_columns_are_never_sampled_or_counted():
    padded = torch.tensor([LOGITS + [50.0, 50.0, 50.0, 50.0]])
    sampler = Sampler(VOCAB, EOS, seed=0)
    rows = [make_row(temperature=0.0), make_row(temperature=1.5, logprobs=3), make_row(ignore_eos=True, top_k=2)]
    for row in rows:
        out = sampler(padded, [row])
        assert out.token_ids.item() < VOCAB
        expected = torch.log_softmax(torch.tensor(LOGITS), dim=-1)[out.token_ids.item()]
        assert out.logprobs.item() == pytest.approx(expected.item(), abs=1e-6)


def test_logprobs_come_from_raw_logits_and_top_logprobs_are_sorted():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    rows = [
        make_row(PROMPT, OUTPUT, temperature=0.4, repetition_penalty=1.8, logprobs=4),
        make_row(temperature=0.0, logit_bias={0: 20.0}),
        make_row(top_k=2, logprobs=0),
    ]
    out = Sampler(VOCAB, EOS, seed=1)(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_ids.shape == (3, 4)
    for i in range(3):
        order = sorted(range(VOCAB), key=lambda t: -raw[i, t].item())[:4]
        assert out.top_ids[i].tolist() == order
        torch.testing.assert_close(out.top_logprobs[i], raw[i, order])


@pytest.mark.parametrize("logprobs", [None, 0])
def test_no_alternatives_without_positive_logprobs(logprobs):
    logits = torch.tensor([LOGITS])
    out = Sampler(VOCAB, EOS)(logits, [make_row(temperature=0.0, logprobs=logprobs)])
    assert out.top_ids is None and out.top_logprobs is None
    assert out.token_ids.tolist() == [2]
    assert out.logprobs.item() == pytest.approx(torch.log_softmax(logits[0], dim=-1)[2].item(), abs=1e-6)


class AllowOnly:
    """A grammar that allows a fixed token set, written in the xgrammar bitmask layout."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        words = [0] * bitmask.shape[1]
        for tok in self.allowed:
            words[tok // 32] |= 1 << (tok % 32)
        bitmask[index] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def test_grammar_rows_are_masked_and_free_rows_untouched():
    structured = make_row(temperature=0.0)
    structured.grammar = AllowOnly({5, 8})
    free = make_row(temperature=0.0)
    logits = torch.tensor([LOGITS, LOGITS])
    sampler = Sampler(VOCAB, EOS)
    assert sampler(logits, [structured, free]).token_ids.tolist() == [8, 2]
    sampling = make_row()
    sampling.grammar = AllowOnly({0, 5, 8})
    assert support(sampler.probabilities(logits[:1], [sampling])[0].tolist()) == {0, 5, 8}


# ---- frequencies ---------------------------------------------------------------------------------

CHI_LOGITS = [1.2, 0.1, -0.4, 0.8, -2.0, 0.5]
DRAWS = 30_000


def chi_square(counts: list[int], expected_probs: list[float]) -> float:
    """Pearson's statistic over the categories with non-zero expected probability."""
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, expected_probs) if p > 0)


def draw_counts(rows: list[Row], sampler: Sampler) -> list[int]:
    logits = torch.tensor([CHI_LOGITS]).expand(len(rows), -1)
    tokens = sampler(logits, rows).token_ids
    return torch.bincount(tokens, minlength=len(CHI_LOGITS)).tolist()


def expected_filtered(temperature: float, top_k: int) -> list[float]:
    scaled = [x / temperature for x in CHI_LOGITS]
    return softmax_over(scaled, ref_top_k(softmax_over(scaled, set(range(6))), top_k))


def test_unseeded_draw_frequencies_match_the_distribution():
    sampler = Sampler(6, set(), seed=1234)
    counts = draw_counts([make_row(temperature=0.8, top_k=4) for _ in range(DRAWS)], sampler)
    right = expected_filtered(0.8, 4)
    critical = chi2.ppf(0.999, df=3)
    assert [c for c, p in zip(counts, right) if p == 0] == [0, 0]
    assert chi_square(counts, right) < critical
    # the same counts are wildly inconsistent with a subtly wrong distribution (no temperature)
    assert chi_square(counts, expected_filtered(1.0, 4)) > 10 * critical


def test_seeded_draw_frequencies_match_the_distribution():
    rows = [make_row(temperature=1.3, top_k=5, seed=s) for s in range(DRAWS // 3)]
    counts = draw_counts(rows, Sampler(6, set()))
    right = expected_filtered(1.3, 5)
    critical = chi2.ppf(0.999, df=4)
    assert chi_square(counts, right) < critical
    assert chi_square(counts, expected_filtered(1.0, 5)) > 5 * critical


def test_seeded_draw_frequencies_without_top_k_match_the_distribution():
    """Without a top_k a seeded row draws one race value per vocabulary token, by token id."""
    rows = [make_row(temperature=0.9, top_p=0.85, seed=s) for s in range(DRAWS // 3)]
    counts = draw_counts(rows, Sampler(6, set()))
    scaled = [x / 0.9 for x in CHI_LOGITS]
    right = softmax_over(scaled, ref_top_p(softmax_over(scaled, set(range(6))), 0.85))
    critical = chi2.ppf(0.999, df=sum(p > 0 for p in right) - 1)
    assert [c for c, p in zip(counts, right) if p == 0] == [0] * right.count(0.0)
    assert chi_square(counts, right) < critical
    assert chi_square(counts, expected_filtered(1.0, 6)) > 5 * critical


# ---- seeded reproducibility ------------------------------------------------------------------------


def generate(rows: list[Row], position: int, steps: int, vocab: int = 40) -> list[int]:
    """Run `steps` sampling steps over `rows`; the tracked row at `position` sees fixed logits per step."""
    sampler = Sampler(vocab, {0})
    step_logits = torch.Generator().manual_seed(99)
    others = torch.Generator().manual_seed(len(rows))
    for _ in range(steps):
        tracked = torch.randn(vocab, generator=step_logits)
        logits = torch.randn(len(rows), vocab, generator=others) * 2
        logits[position] = tracked
        out = sampler(logits, rows)
        for row, tok in zip(rows, out.token_ids.tolist()):
            row.output_token_ids.append(tok)
    return rows[position].output_token_ids


def tracked_row() -> Row:
    return make_row([5, 6, 7], temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=2024)


def test_seeded_row_is_reproducible_whatever_else_is_in_the_batch():
    alone = generate([tracked_row()], position=0, steps=25)
    crowd = [
        make_row(temperature=1.0, seed=7),
        make_row(temperature=0.0),
        make_row(temperature=1.5, top_k=3),
        tracked_row(),
        make_row([1, 2], presence_penalty=1.0, min_p=0.1, seed=8, logprobs=5),
        make_row(typical_p=0.5),
    ]
    assert generate(crowd, position=3, steps=25) == alone
    assert len(set(alone)) > 5  # it really sampled, not a constant argmax


def test_seeded_row_with_top_k_is_reproducible_whatever_else_is_in_the_batch():
    """Alone, its top_k makes the batch sample among top-k candidates; in the crowd a larger top_k
    and a row without one (the whole vocabulary sorted) change the candidate width."""
    def tracked() -> Row:
        return make_row([5, 6, 7], temperature=1.2, top_k=12, top_p=0.97, frequency_penalty=0.2, seed=31)

    alone = generate([tracked()], position=0, steps=25)
    crowd = [make_row(top_k=30, seed=4), tracked(), make_row(temperature=0.7), make_row(top_k=2)]
    assert generate(crowd, position=1, steps=25) == alone
    crowd_with_top_k = [make_row(top_k=30), make_row(top_k=3, seed=9), tracked()]
    assert generate(crowd_with_top_k, position=2, steps=25) == alone
    assert len(set(alone)) > 5


def test_different_seeds_give_different_samples():
    first = generate([tracked_row()], position=0, steps=25)
    other = tracked_row()
    other.generator = torch.Generator().manual_seed(1)
    assert generate([other], position=0, steps=25) != first
