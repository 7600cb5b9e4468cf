"""The demo Medusa adapter (json-medusa): a LoRAX Medusa-LoRA folder for the default model whose heads draft
the json adapter's own replies, on questions they never saw, well enough to pay off."""

from __future__ import annotations

import json

import pytest
import torch

from lorax_mlflow.adapters.adapter_folder import BaseModelShape, load_adapter_folder
from lorax_mlflow.demo_adapters import LORA_TARGETS, _tokenize_conversation, generate_replies
from lorax_mlflow.demo_medusa import DEMO_MEDUSA_NAME, distill, ensure_demo_medusa, head_quality, load_merged
from lorax_mlflow.demo_tasks import HELD_OUT_PROMPTS

# Measured on the 2-core CPU with the default recipe, teacher forced on the json LoRA's greedy replies to
# the 16 held-out prompts: top-1 accuracy per head 0.51 / 0.45 / 0.38, 2.08 tokens per step (3.18 on the
# training conversations); zero (untrained) heads: see the test.
MIN_HELD_OUT_TOKENS_PER_STEP = 1.8

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder():
    return ensure_demo_medusa()[DEMO_MEDUSA_NAME]


@pytest.fixture(scope="module")
def merged(folder):
    return load_merged(folder)


def test_it_is_a_medusa_lora_folder_for_the_default_model(folder, merged):
    model, _ = merged
    config = json.loads((folder / "config.json").read_text())
    assert (config["medusa_num_heads"], config["medusa_num_layers"]) == (3, 1)
    lm_head = model.get_output_embeddings().weight
    modules = {name: (module.in_features, module.out_features) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in LORA_TARGETS}
    weights = load_adapter_folder(folder, DEMO_MEDUSA_NAME, BaseModelShape(modules, lm_head.shape[1], lm_head.shape[0]),
                                  max_rank=64, target_modules=LORA_TARGETS)
    assert weights.rank == 8 and weights.medusa.num_heads == 3 and weights.medusa.out_w is None


def test_cached_by_recipe(folder):
    heads_file = folder / "medusa_lm_head.safetensors"
    trained_at = heads_file.stat().st_mtime_ns
    assert ensure_demo_medusa()[DEMO_MEDUSA_NAME] == folder
    assert heads_file.stat().st_mtime_ns == trained_at


def test_heads_draft_held_out_replies_far_better_than_untrained_heads(folder, merged):
    from safetensors.torch import load_file

    model, tokenizer = merged
    replies = generate_replies(model, tokenizer, HELD_OUT_PROMPTS, max_new_tokens=48)
    data = distill(model, [_tokenize_conversation(tokenizer, q, a) for q, a in zip(HELD_OUT_PROMPTS, replies)], 3,
                   tokenizer.pad_token_id)
    tensors = load_file(folder / "medusa_lm_head.safetensors")
    weight = torch.stack([tensors[f"{k}.0.linear.weight"] for k in range(3)])
    bias = torch.stack([tensors[f"{k}.0.linear.bias"] for k in range(3)])
    lm_head = model.get_output_embeddings().weight.detach()

    trained = head_quality(data, weight, bias, lm_head)
    untrained = head_quality(data, torch.zeros_like(weight), torch.zeros_like(bias), lm_head)

    assert trained.tokens_per_step >= MIN_HELD_OUT_TOKENS_PER_STEP, trained
    assert trained.tokens_per_step > untrained.tokens_per_step + 0.5, (trained, untrained)
