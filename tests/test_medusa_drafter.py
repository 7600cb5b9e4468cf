"""Medusa drafting in one batch over rows with different heads equals each row's heads run alone, in float64."""

from __future__ import annotations

import torch

from lorax_mlflow.lora.weights import MedusaHeads
from lorax_mlflow.engine.medusa_drafter import draft_medusa

HIDDEN, VOCAB = 16, 50


def random_heads(seed: int, num_heads: int, num_layers: int, own_output: bool) -> MedusaHeads:
    g = torch.Generator().manual_seed(seed)
    out_w = torch.randn(num_heads, VOCAB, HIDDEN, generator=g) if own_output else None
    return MedusaHeads(num_layers, torch.randn(num_heads, num_layers, HIDDEN, HIDDEN, generator=g) * 0.3,
                       torch.randn(num_heads, num_layers, HIDDEN, generator=g) * 0.3, out_w)


def reference_chain(x: torch.Tensor, heads: MedusaHeads, count: int, lm_head: torch.Tensor) -> list[int]:
    chain = []
    for k in range(min(count, heads.num_heads)):
        h = x.double()
        for layer in range(heads.num_layers):
            h = h + torch.nn.functional.silu(heads.linear_w[k, layer].double() @ h + heads.linear_b[k, layer].double())
        out = heads.out_w[k] if heads.out_w is not None else lm_head
        chain.append(int((out.double() @ h).argmax()))
    return chain


def test_mixed_heads_in_one_batch_equal_each_row_alone():
    lm_head = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
    shared_a = random_heads(1, num_heads=3, num_layers=1, own_output=False)
    shared_b = random_heads(2, num_heads=2, num_layers=2, own_output=False)  # fewer heads than asked for
    own = random_heads(3, num_heads=4, num_layers=1, own_output=True)
    rows = [shared_a, shared_b, own, shared_a, own, shared_b]
    counts = [3, 3, 2, 1, 4, 0]
    hidden = torch.randn(len(rows), HIDDEN, generator=torch.Generator().manual_seed(4))

    drafts = draft_medusa(hidden, rows, counts, lm_head)

    assert drafts == [reference_chain(hidden[i], rows[i], counts[i], lm_head) for i in range(len(rows))]
    assert [len(d) for d in drafts] == [3, 2, 2, 1, 4, 0]
