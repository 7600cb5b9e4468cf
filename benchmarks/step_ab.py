"""Decode step A/B in one process: `--requests` sequences decoding on the base model vs the same prompts
spread over `--adapters` random r=`--rank` adapters (all 7 projections), EngineCore.step on this thread.

Rounds alternate (base, mixed, mixed, base, ...); each round admits the requests, runs the prefill and
two warm steps, times `--steps` decode steps and aborts them. Prints the median step of each kind, their
ratio, and per part of the step (scheduler, meta build, attention context, model forward, the LoRA
calls inside it, sampling) the median time per step, so that what a mixed step adds beyond its LoRA
GEMMs shows as a difference outside the `add_lora` row. `--cpu-time` times with the process's CPU
time instead of the wall clock: on a shared, throttled machine the wall clock measures the neighbours.
Run from the repository root: python -m benchmarks.step_ab [--threads 2] [--cpu-time]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

import lorax_kernels.torch_ops as torch_ops
import lorax_mlflow.engine.model_runner as model_runner
from benchmarks.common import PROMPTS, machine_line, make_random_adapters
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.default_model import cache_root, default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.core import EngineCore
from lorax_mlflow.engine.messages import AddRequest
from lorax_mlflow.engine.sampling_params import SamplingParams


class PartTimes:
    """Seconds spent in wrapped functions, summed until `clear`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, attr: str, label: str) -> None:
        function = getattr(owner, attr)

        def timed(*args, **kwargs):
            started = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += self.clock() - started

        setattr(owner, attr, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each kind (the median is printed)")
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU time, not the wall clock")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter

    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapter_dir = cache_root() / "bench-adapters" / f"r{args.rank}"
    folders = make_random_adapters(base, adapter_dir, args.adapters, args.rank)
    core = EngineCore(base, EngineConfig(max_loras=args.adapters, max_lora_rank=args.rank,
                                         adapter_roots=[str(adapter_dir)]))
    keys = []
    for name in sorted(folders):
        resolved = core.adapters.resolve(AdapterRequest(str(folders[name])))
        core.adapters.wait_loaded(resolved)
        keys.append(resolved.key)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)

    parts = PartTimes(clock)
    parts.wrap(core.scheduler, "schedule", "scheduler")
    parts.wrap(model_runner, "make_lora_meta", "LoRA meta")
    parts.wrap(model_runner, "build_attention_context", "attention context")
    parts.wrap(core.runner.model, "forward", "model forward")
    parts.wrap(torch_ops, "add_lora", "  add_lora (LoRA)")
    parts.wrap(core, "_sample", "sampling + emit")
    submitted = [0]

    def run_round(kind: str) -> tuple[float, dict[str, float]]:
        ids = []
        for i in range(args.requests):
            submitted[0] += 1
            ids.append(f"{kind}-{submitted[0]}")
            key = None if kind == "base" else keys[i % len(keys)]
            core.add_request(AddRequest.of(ids[-1], prompts[i], params, key))
        for _ in range(3):  # prefill, two warm decode steps
            core.step()
        parts.seconds.clear()
        times = []
        for _ in range(args.steps):
            started = clock()
            core.step()
            times.append(clock() - started)
        for request_id in ids:
            core.abort_request(request_id)
        return statistics.median(times), {label: s / args.steps for label, s in parts.seconds.items()}

    for kind in ("base", "mixed"):  # warm-up
        run_round(kind)
    steps: dict[str, list[float]] = {"base": [], "mixed": []}
    by_part: dict[str, dict[str, list[float]]] = {"base": defaultdict(list), "mixed": defaultdict(list)}
    for r in range(args.rounds):
        for kind in ("base", "mixed") if r % 2 == 0 else ("mixed", "base"):
            step, part = run_round(kind)
            steps[kind].append(step)
            for label, seconds in part.items():
                by_part[kind][label].append(seconds)

    base_step, mixed_step = statistics.median(steps["base"]), statistics.median(steps["mixed"])
    print(f"\n{args.requests} decoding sequences, base-only vs {args.adapters} adapters r={args.rank} (all 7 "
          f"projections); {args.threads} torch threads, {'CPU' if args.cpu_time else 'wall'} time, "
          f"median of {args.rounds} rounds x {args.steps} steps; {machine_line()}")
    print(f"step: base {base_step * 1e3:.2f} ms, mixed {mixed_step * 1e3:.2f} ms, mixed / base {mixed_step / base_step:.3f}"
          f" (rounds: {', '.join(f'{m / b:.3f}' for m, b in zip(steps['mixed'], steps['base']))})")
    print(f"{'part (ms per step)':<22} {'base':>9} {'mixed':>9} {'mixed - base':>13}")
    for label in by_part["mixed"]:
        b = statistics.median(by_part["base"].get(label, [0.0])) * 1e3
        m = statistics.median(by_part["mixed"][label]) * 1e3
        print(f"{label:<22} {b:>9.2f} {m:>9.2f} {m - b:>+13.2f}")
    lora = statistics.median(by_part["mixed"]["  add_lora (LoRA)"])
    print(f"LoRA share of the mixed step: {lora / mixed_step:.1%}")
    core.shutdown()


if __name__ == "__main__":
    main()
