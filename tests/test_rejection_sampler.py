"""Speculative rejection sampling keeps the target distribution at every emitted position (chi-square,
as the sampler tests do), leaves greedy output unchanged, and keeps seeded rows reproducible; and the
prompt-lookup drafter proposes what followed the latest earlier match."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from lorax_mlflow.engine.prompt_lookup import propose_prompt_lookup
from lorax_mlflow.engine.rejection_sampler import rejection_sample

VOCAB = 6
# target distributions after the prefix, after draft 1, after drafts 1-2 (each position's own p)
TARGET = torch.tensor([
    [0.05, 0.40, 0.10, 0.25, 0.15, 0.05],
    [0.30, 0.05, 0.05, 0.20, 0.10, 0.30],
    [0.10, 0.10, 0.50, 0.10, 0.10, 0.10],
])
DRAFTER = torch.tensor([  # a drafter that is wrong in its own way at each position
    [0.30, 0.10, 0.30, 0.10, 0.10, 0.10],
    [0.05, 0.40, 0.05, 0.40, 0.05, 0.05],
])
ROWS = 40_000


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability zero was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def emitted_at(tokens: torch.Tensor, position: int) -> torch.Tensor:
    column = tokens[:, position]
    return torch.bincount(column[column >= 0], minlength=VOCAB).float()


def run(draft_ids: torch.Tensor, draft_probs: torch.Tensor | None, seed: int = 0):
    rows = draft_ids.shape[0]
    return rejection_sample(
        TARGET.expand(rows, -1, -1),
        draft_ids,
        torch.full((rows,), 2),
        [None] * rows,
        torch.Generator().manual_seed(seed),
        draft_probs=draft_probs,
    )


@pytest.mark.parametrize("drafter", ["sampled", "deterministic"])
def test_every_emitted_position_follows_the_target_distribution(drafter):
    generator = torch.Generator().manual_seed(1)
    if drafter == "sampled":
        drafts = torch.stack([torch.multinomial(q, ROWS, replacement=True, generator=generator) for q in DRAFTER], 1)
        out = run(drafts, DRAFTER.expand(ROWS, -1, -1))
    else:  # a top-1 chain: always tokens 1 then 0
        out = run(torch.tensor([[1, 0]]).expand(ROWS, -1), None)

    critical = chi2.ppf(0.999, df=VOCAB - 1)
    for position in range(3):
        counts = emitted_at(out.token_ids, position)
        assert counts.sum() > 1000
        assert chi_square(counts, TARGET[position]) < critical, position
        # and it can fail: the drafter's distribution (or the point mass) is clearly rejected
        if position < 2:
            wrong = DRAFTER[position] if drafter == "sampled" else torch.eye(VOCAB)[[1, 0][position]] * 0.9 + 0.02
            assert chi_square(counts, wrong / wrong.sum()) > 10 * critical


def test_acceptance_rate_is_the_overlap_of_target_and_drafter():
    generator = torch.Generator().manual_seed(2)
    drafts = torch.multinomial(DRAFTER[0], ROWS, replacement=True, generator=generator)[:, None]
    out = rejection_sample(
        TARGET[:2].expand(ROWS, -1, -1), drafts, torch.ones(ROWS, dtype=torch.long), [None] * ROWS,
        torch.Generator().manual_seed(3), draft_probs=DRAFTER[:1].expand(ROWS, -1, -1),
    )
    overlap = torch.minimum(TARGET[0], DRAFTER[0]).sum()
    assert abs(out.num_accepted.float().mean() - overlap) < 0.01


def test_greedy_rows_accept_exactly_the_argmax_prefix_and_emit_the_argmax():
    one_hot = torch.eye(VOCAB)[[1, 0, 2]][None]  # argmax chain 1, 0, 2
    drafts = torch.tensor([[1, 0], [1, 5], [4, 0], [1, 0]])
    out = rejection_sample(
        one_hot.expand(4, -1, -1), drafts, torch.tensor([2, 2, 2, 1]), [None] * 4, torch.Generator().manual_seed(0)
    )
    assert out.num_accepted.tolist() == [2, 1, 0, 1]
    assert out.token_ids.tolist() == [[1, 0, 2], [1, 0, -1], [1, -1, -1], [1, 0, -1]]


def test_rows_without_drafts_draw_one_token_from_the_target():
    out = rejection_sample(
        TARGET[:1].expand(ROWS, -1, -1), torch.zeros(ROWS, 0, dtype=torch.long), torch.zeros(ROWS, dtype=torch.long),
        [None] * ROWS, torch.Generator().manual_seed(4),
    )
    assert (out.num_accepted == 0).all()
    assert chi_square(emitted_at(out.token_ids, 0), TARGET[0]) < chi2.ppf(0.999, df=VOCAB - 1)


def test_seeded_row_is_reproducible_whatever_else_is_in_the_batch():
    def seeded_row(batch_size: int, shared_seed: int) -> list[int]:
        generators = [torch.Generator().manual_seed(42)] + [None] * (batch_size - 1)
        drafts = torch.tensor([[2, 3]]).expand(batch_size, -1)
        num_drafts = torch.tensor([2] + [1] * (batch_size - 1))
        out = rejection_sample(TARGET.expand(batch_size, -1, -1), drafts, num_drafts, generators,
                               torch.Generator().manual_seed(shared_seed))
        return out.token_ids[0].tolist()

    alone = [seeded_row(1, 0)]
    assert all(seeded_row(size, shared) == alone[0] for size, shared in [(3, 1), (7, 2), (16, 3)])


@pytest.mark.parametrize(
    "tokens, k, expected",
    [
        ([1, 2, 3, 4, 5, 1, 2, 3], 3, [4, 5, 1]),  # longest suffix n-gram (1 2 3) found
        ([1, 2, 3, 4, 5, 9, 2, 3], 2, [4, 5]),  # falls back to the 2-gram
        ([5, 1, 2, 9, 1, 2, 8, 3, 1, 2], 3, [8, 3, 1]),  # the latest earlier match wins
        ([7, 7, 7], 3, [7]),  # continuation stops at the end of the sequence
        ([1, 2, 3], 3, []),  # no earlier occurrence
        ([1], 3, []),
        ([1, 2, 1], 0, []),
    ],
)
def test_prompt_lookup_proposes_what_followed_the_latest_match(tokens, k, expected):
    assert propose_prompt_lookup(tokens, k) == expected


def test_verify_emits_the_greedy_chain_with_raw_logprobs_and_mixes_draft_counts():
    from dataclasses import dataclass, field

    from lorax_mlflow.engine.sampler import Sampler
    from lorax_mlflow.engine.sampling_params import SamplingParams
    from lorax_mlflow.engine.speculative import verify

    @dataclass
    class Row:
        params: SamplingParams
        prompt_token_ids: list = field(default_factory=list)
        output_token_ids: list = field(default_factory=list)
        generator: object = None
        grammar: object = None

    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(5))  # row 0: 3 positions, row 1: 1, row 2: 2
    argmax = logits.argmax(-1).tolist()
    rows = [Row(SamplingParams(temperature=0.0, logprobs=2)), Row(SamplingParams(temperature=0.0)),
            Row(SamplingParams(temperature=0.0))]
    drafts = [[argmax[0], (argmax[1] + 1) % VOCAB], [], [argmax[4]]]

    out = verify(Sampler(VOCAB, set(), seed=0), logits, rows, drafts)

    assert [r.token_ids for r in out] == [[argmax[0], argmax[1]], [argmax[3]], [argmax[4], argmax[5]]]
    assert [(r.num_drafts, r.num_accepted) for r in out] == [(2, 1), (0, 0), (1, 1)]
    raw = torch.log_softmax(logits, -1)
    assert out[0].logprobs == pytest.approx([raw[0, argmax[0]].item(), raw[1, argmax[1]].item()])
    assert [t for t, _ in out[0].top[1]] == raw[1].topk(2).indices.tolist() and out[1].top is None
