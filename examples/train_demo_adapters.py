"""Train the demo LoRA adapters of the embedded default model, then show that each one works.

For every adapter it prints how often its behaviour (pirate talk, a JSON object, French) shows in
greedy replies to held-out prompts, with the adapter and with the base model alone, plus one
sample reply. Adapters already trained with the same recipe are reused from the cache.

    python examples/train_demo_adapters.py                 # all three, cached in ~/.cache/lorax-mlflow
    python examples/train_demo_adapters.py --only pirate --steps 20 --out /tmp/demo --force

On a CPU shared with other busy processes, OMP_NUM_THREADS=1 trains faster than torch's default.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lorax_mlflow.demo_adapters import (
    DEMO_ADAPTERS,
    demo_adapters_dir,
    ensure_demo_adapters,
    generate_replies,
    held_out_prompts,
    load_with_adapters,
    marker_rate,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"adapter folder (default {demo_adapters_dir()})")
    parser.add_argument("--steps", type=int, default=None, help="training steps per adapter (default: the recipe's)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached adapter matches the recipe")
    parser.add_argument("--only", choices=sorted(DEMO_ADAPTERS), action="append", help="train only this adapter")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="reply length for the marker check")
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    names = args.only or list(DEMO_ADAPTERS)

    folders, seconds = {}, {}
    for name in names:
        started = time.perf_counter()
        folders.update(ensure_demo_adapters([name], steps=args.steps, root=args.out, force=args.force))
        seconds[name] = time.perf_counter() - started

    model, tokenizer = load_with_adapters(folders)
    base_replies_by_prompts: dict[tuple[str, ...], list[str]] = {}  # the adapters share held-out prompts
    print(f"\n{'adapter':<8} {'train/load s':>12} {'adapter rate':>12} {'base rate':>9}  sample reply (held out)")
    for name in names:
        prompts = held_out_prompts(name)
        model.set_adapter(name)
        replies = generate_replies(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
        if tuple(prompts) not in base_replies_by_prompts:
            with model.disable_adapter():
                base_replies_by_prompts[tuple(prompts)] = generate_replies(
                    model, tokenizer, prompts, max_new_tokens=args.max_new_tokens
                )
        base_replies = base_replies_by_prompts[tuple(prompts)]
        print(
            f"{name:<8} {seconds[name]:>12.1f} {marker_rate(name, replies):>12.2f} "
            f"{marker_rate(name, base_replies):>9.2f}  {prompts[0]!r} -> {replies[0]!r}"
        )


if __name__ == "__main__":
    main()
