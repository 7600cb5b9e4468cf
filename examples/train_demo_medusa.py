"""Train the demo Medusa adapter (json-medusa: the json demo LoRA plus 3 Medusa heads), then show how well it drafts.

The heads are checked on replies they never saw: the json LoRA answers held-out questions greedily,
and on those replies (teacher forced) the script prints each head's top-1 accuracy and the tokens a
top-1 chain would emit per step. `benchmarks/speculative.py` measures the same through the engine.
An adapter already trained with the same recipe is reused from the cache.

    python examples/train_demo_medusa.py               # cached in ~/.cache/lorax-mlflow/demo-adapters
    python examples/train_demo_medusa.py --out /tmp/demo --force --epochs 10
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lorax_mlflow.adapters.medusa_format import load_medusa_heads, read_medusa_config
from lorax_mlflow.demo_adapters import _tokenize_conversation, demo_adapters_dir, generate_replies
from lorax_mlflow.demo_medusa import (
    DEMO_MEDUSA_NAME,
    DEMO_MEDUSA_TASK,
    MedusaRecipe,
    distill,
    ensure_demo_medusa,
    head_quality,
    load_merged,
)
from lorax_mlflow.demo_tasks import HELD_OUT_PROMPTS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"adapters folder (default {demo_adapters_dir()})")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached adapter matches the recipe")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="reply length of the held-out check")
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    recipe = MedusaRecipe() if args.epochs is None else MedusaRecipe(epochs=args.epochs)
    started = time.perf_counter()
    folder = ensure_demo_medusa(args.out, recipe=recipe, force=args.force)[DEMO_MEDUSA_NAME]
    seconds = time.perf_counter() - started

    model, tokenizer = load_merged(folder)  # the folder carries the json LoRA too
    replies = generate_replies(model, tokenizer, HELD_OUT_PROMPTS, max_new_tokens=args.max_new_tokens)
    examples = [_tokenize_conversation(tokenizer, q, a) for q, a in zip(HELD_OUT_PROMPTS, replies)]
    config = read_medusa_config(folder, DEMO_MEDUSA_NAME)
    lm_head = model.get_output_embeddings().weight.detach()
    heads = load_medusa_heads(folder, DEMO_MEDUSA_NAME, config, hidden_size=lm_head.shape[1], vocab_size=lm_head.shape[0])
    data = distill(model, examples, heads.num_heads, tokenizer.pad_token_id)
    quality = head_quality(data, heads.linear_w[:, 0], heads.linear_b[:, 0], lm_head)

    print(f"\n{DEMO_MEDUSA_NAME} ({DEMO_MEDUSA_TASK} LoRA + {heads.num_heads} Medusa heads) in {folder}, "
          f"train/load {seconds:.1f} s")
    print(f"held-out replies: {len(replies)}, positions: {len(data.hidden)}")
    print("top-1 accuracy per head: " + ", ".join(f"head {k + 1}: {a:.2f}" for k, a in enumerate(quality.accuracy)))
    print(f"tokens per step of a top-1 chain (teacher forced): {quality.tokens_per_step:.2f}")
    print(f"sample: {HELD_OUT_PROMPTS[0]!r} -> {replies[0]!r}")


if __name__ == "__main__":
    main()
