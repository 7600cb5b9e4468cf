"""Multi-adapter throughput on the embedded default model, all baselines in the same process, on the
engine's device and dtype (the header names both; PEFT runs on the same).

16 concurrent requests x 64 new tokens over 8 distinct r=16 adapters (all 7 projections):
  engine base-only | engine with 8 adapters | PEFT mixed-batch generate(adapter_names=...) |
  sequential PEFT generate, one request at a time.
Targets: engine mixed >= 0.85x engine base-only, and >= 2x PEFT mixed-batch.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import PROMPTS, device_label, machine_line, make_random_adapters
from benchmarks.gpu_throughput import roofline_seconds, timed_decode_steps
from benchmarks.kernels import copy_bandwidth_bytes_per_ms
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.default_model import cache_root, default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.llm_engine import LLMEngine
from lorax_mlflow.engine.sampling_params import SamplingParams


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        for i in range(count)
    ]


def run_engine(engine: LLMEngine, prompts, adapter_ids, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    streams = [
        engine.submit(p, params, AdapterRequest(a) if a else None) for p, a in zip(prompts, adapter_ids)
    ]
    tokens = sum(len(s.result().outputs[0].token_ids) for s in streams)
    return tokens / (time.perf_counter() - started)


def run_peft_mixed(peft_model, tokenizer, prompts, names, max_tokens: int) -> float:
    texts = [tokenizer.decode(p) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(peft_model.device)
    started = time.perf_counter()
    with torch.no_grad():
        out = peft_model.generate(**batch, adapter_names=names, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return tokens / (time.perf_counter() - started)


def run_peft_sequential(peft_model, prompts, names, max_tokens: int, pad_id: int) -> float:
    started = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for prompt, name in zip(prompts, names):
            peft_model.set_adapter(name)
            out = peft_model.generate(torch.tensor([prompt], device=peft_model.device), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=pad_id)
            tokens += out.shape[1] - len(prompt)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--num-threads", type=int, default=None, help="engine thread's torch threads")
    parser.add_argument("--device", default="auto", help="engine and PEFT device (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="engine and PEFT dtype (auto: the engine's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapter_dir = cache_root() / "bench-adapters" / f"r{args.rank}"
    adapters = make_random_adapters(base, adapter_dir, args.adapters, args.rank)
    names = list(adapters)
    prompts = chat_prompts(tokenizer, args.requests)
    per_request = [names[i % len(names)] for i in range(args.requests)]

    engine = LLMEngine(base, EngineConfig(max_loras=args.adapters, max_lora_rank=args.rank,
                                          adapter_roots=[str(adapter_dir)], num_threads=args.num_threads,
                                          device=args.device, dtype=args.dtype)).start()
    device, dtype = engine.runner.device, engine.runner.dtype
    paths = [str(adapters[n]) for n in per_request]
    run_engine(engine, prompts[:len(names)], paths[:len(names)], 4)  # warm-up: loads every adapter into a slot
    run_engine(engine, prompts[:2], [None, None], 4)
    results, step_lines = {}, []
    bandwidth = copy_bandwidth_bytes_per_ms(device, repeats=5) * 1e3
    for label, ids in (("engine, base only", [None] * len(prompts)), (f"engine, {args.adapters} adapters", paths)):
        with timed_decode_steps(engine.runner, len(prompts)) as steps:
            results[label] = run_engine(engine, prompts, ids, args.max_tokens)
        if steps:
            median = sorted(steps, key=lambda step: step.seconds)[len(steps) // 2]
            floor = roofline_seconds(median, engine.runner, args.rank, bandwidth)
            step_lines.append(f"{label:<32} {median.seconds * 1e3:>15.2f} {floor * 1e3:>12.2f} "
                              f"{median.seconds / floor:>14.2f}")
    engine.shutdown()

    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()  # same device and dtype
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.eval()
    results["PEFT mixed-batch generate"] = run_peft_mixed(peft_model, tokenizer, prompts, per_request, args.max_tokens)
    if not args.skip_sequential:
        results["PEFT sequential generate"] = run_peft_sequential(
            peft_model, prompts, per_request, args.max_tokens, tokenizer.pad_token_id)

    mixed = results[f"engine, {args.adapters} adapters"]
    print(f"\n{args.requests} requests x {args.max_tokens} new tokens, {args.adapters} adapters r={args.rank}, "
          f"SmolLM2-135M {device_label(device, dtype)}, engine threads {args.num_threads or 'default'}; "
          f"{machine_line()}")
    print(f"{'run':<32} {'tokens/s':>10} {'engine-mixed / this':>20}")
    for name, value in results.items():
        print(f"{name:<32} {value:>10.1f} {mixed / value:>20.2f}x")
    print(f"\ndecode step (all {len(prompts)} sequences, median) against its memory roofline: weights + KV + "
          f"active adapters read per step / copy bandwidth {bandwidth / 1e9:.1f} GB/s measured in this run")
    print(f"{'run':<32} {'decode step ms':>15} {'roofline ms':>12} {'step/roofline':>14}")
    for line in step_lines:
        print(line)
    print(f"\nengine mixed / engine base-only = {mixed / results['engine, base only']:.2f} (target >= 0.85)")
    print(f"engine mixed / PEFT mixed-batch = {mixed / results['PEFT mixed-batch generate']:.2f} (target >= 2)")


if __name__ == "__main__":
    main()
