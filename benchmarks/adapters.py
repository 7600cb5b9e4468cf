"""Adapter loading and swapping on the embedded default model (SmolLM2-135M), in one process, on the
engine's default device and dtype (the headers name both).

1. Cold load latency: local PEFT folder -> weights in host memory -> placed in a device slot, for
   ranks 8/16/64 (all 7 projections). Each measurement uses an adapter the engine has never seen;
   the files themselves may be in the OS page cache (the disk tier). Target: < 50 ms for r=16.
2. Throughput: 32 clients in a closed loop (each sends its next request when the last finishes),
   request i naming adapter i % N, with 8 device slots, N = 100 vs N = 8. Adapters are in host
   memory beforehand (steady state: the 100-adapter run swaps device slots, it does not read
   disk). A third row gives the 100 adapters as many slots as memory holds (`max_loras=None`, the
   default): at most `max_loras` distinct adapters decode in one step, so with 8 slots most
   clients wait for a slot. Target: N=100 tokens/s >= 0.8 x N=8 with slots sized from memory.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import ALL_TARGETS, PROMPTS, device_label, machine_line
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.default_model import cache_root, default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.engine.sampling_params import SamplingParams


def make_adapters(base_dir: Path, out_dir: Path, count: int, rank: int) -> list[Path]:
    """`count` distinct random PEFT adapters of `rank`, made from one PEFT model (fast), cached on disk."""
    folders = [out_dir / f"adapter-{i}" for i in range(count)]
    missing = [(i, f) for i, f in enumerate(folders) if not (f / "adapter_model.safetensors").exists()]
    if not missing:
        return folders
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    lora_params = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    for i, folder in missing:
        generator = torch.Generator().manual_seed(1000 * rank + i)
        with torch.no_grad():
            for param in lora_params:  # small deltas keep the outputs sane
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        peft_model.save_pretrained(folder)
    return folders


def cold_load_ms(engine: EngineClient, folder: Path) -> tuple[float, float]:
    """(resolve + load into host memory, placement into a slot) in ms, on this (engine) thread."""
    started = time.perf_counter()
    resolved = engine.adapters.resolve(AdapterRequest(str(folder)))
    engine.adapters.wait_loaded(resolved)
    loaded = time.perf_counter()
    slot = engine.core.adapters.acquire(resolved.key)
    placed = time.perf_counter()
    assert slot is not None and slot >= 0
    engine.core.adapters.release(slot)
    return (loaded - started) * 1000, (placed - loaded) * 1000


def measure_cold_loads(base: Path, ranks: list[int], repeats: int) -> list[tuple[int, float, float, float]]:
    rows = []
    for rank in ranks:
        folders = make_adapters(base, cache_root() / "bench-adapters" / f"cold-r{rank}", repeats + 1, rank)
        # In-process and idle: this thread may act as the loop thread and acquire slots itself.
        engine = EngineClient(base, EngineConfig(max_loras=8, max_lora_rank=max(ranks), adapter_roots=[str(folders[0].parent)],
                                                 kv_cache_bytes=64 << 20, in_process=True))
        cold_load_ms(engine, folders[0])  # warm-up: first-use costs of the code paths, not of adapters
        times = [cold_load_ms(engine, folder) for folder in folders[1:]]
        engine.shutdown()
        load = statistics.median(t[0] for t in times)
        place = statistics.median(t[1] for t in times)
        total = statistics.median(t[0] + t[1] for t in times)
        rows.append((rank, load, place, total))
    return rows


def closed_loop_tokens_per_s(engine: EngineClient, prompts: list[list[int]], adapters: list[Path], clients: int,
                             requests: int, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    counter = iter(range(requests))
    lock = threading.Lock()
    generated = [0] * clients

    def client(index: int) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            request = AdapterRequest(str(adapters[i % len(adapters)]))
            generated[index] += len(engine.submit(prompts[i % len(prompts)], params, request).result().outputs[0].token_ids)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(generated) / (time.perf_counter() - started)


def measure_throughput(base: Path, args: argparse.Namespace) -> list[tuple[str, float, dict]]:
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        for p in PROMPTS
    ]
    adapters = make_adapters(base, cache_root() / "bench-adapters" / f"many-r{args.rank}", args.adapters, args.rank)
    runs = [(f"{args.adapters} adapters, {args.slots} slots", adapters, args.slots),
            (f"{args.slots} adapters, {args.slots} slots", adapters[: args.slots], args.slots),
            (f"{args.adapters} adapters, sized slots", adapters, None)]
    results = []
    for name, used, slots in runs:
        engine = EngineClient(base, EngineConfig(max_loras=slots, max_lora_rank=args.rank,
                                                 adapter_roots=[str(adapters[0].parent)], in_process=True))
        name = name.replace("sized", str(engine.core.runner.max_loras))
        for folder in used:  # steady state: every adapter already in host memory
            engine.adapters.wait_loaded(engine.adapters.resolve(AdapterRequest(str(folder))))
        closed_loop_tokens_per_s(engine, prompts, used, args.clients, args.clients, 2)  # warm-up
        rate = closed_loop_tokens_per_s(engine, prompts, used, args.clients, args.requests, args.max_tokens)
        stats = engine.adapters.adapter_stats().values()
        counts = {"slot placements": sum(s.slot_placements for s in stats),
                  "disk loads": sum(s.loads for s in stats)}
        engine.shutdown()
        results.append((name, rate, counts))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--repeats", type=int, default=5, help="cold loads measured per rank")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput run")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="rank of the throughput adapters")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = default_model_path()
    defaults = EngineConfig()  # every engine here runs on the default device and dtype
    ran_on = device_label(defaults.resolved_device(), defaults.resolved_dtype())

    cold = measure_cold_loads(base, args.ranks, args.repeats)
    print(f"\nCold adapter load, SmolLM2-135M {ran_on}, 7 projections x 30 layers, median of {args.repeats}; "
          f"{machine_line()}")
    print(f"{'rank':>5} {'resolve+load ms':>16} {'slot placement ms':>18} {'total ms':>9}")
    for rank, load, place, total in cold:
        print(f"{rank:>5} {load:>16.1f} {place:>18.1f} {total:>9.1f}")
    r16 = [total for rank, _, _, total in cold if rank == 16]
    if r16:
        print(f"r=16 cold load = {r16[0]:.1f} ms (target < 50)")

    if args.skip_throughput:
        return
    results = measure_throughput(base, args)
    print(f"\n{args.clients} clients (closed loop), {args.requests} requests x {args.max_tokens} new tokens, "
          f"r={args.rank}, SmolLM2-135M {ran_on}; {machine_line()}")
    print(f"{'run':<28} {'tokens/s':>9} {'vs 8 adapters':>14} {'slot placements':>16} {'disk loads':>11}")
    reference = results[1][1]
    for name, rate, counts in results:
        print(f"{name:<28} {rate:>9.1f} {rate / reference:>13.2f}x {counts['slot placements']:>16} "
              f"{counts['disk loads']:>11}")
    print(f"{args.adapters}-adapter / {args.slots}-adapter throughput: {results[0][1] / reference:.2f} with "
          f"{args.slots} slots, {results[2][1] / reference:.2f} with slots sized from memory (target >= 0.8)")


if __name__ == "__main__":
    main()
