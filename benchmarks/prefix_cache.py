"""Prefix caching on multi-turn chat, with and without the cache in the same run (CPU, default model).

`--conversations` concurrent conversations spread over `--adapters` random r=16 adapters, each
`--turns` turns of stateless chat (every turn resends the whole history, as OpenAI clients do), a
`--system-tokens` shared system prompt and `--user-tokens` per user message, greedy replies of
`--max-tokens`. Each mode runs on its own engine client (the surface under predict() and the
server; its core in its own process, or on a thread of this one with `--in-process`), one after the other. Printed per mode: median time to first token of the last turn, total wall time and output
tokens/s; then the ratios against the issue's targets (last-turn TTFT >= 8x lower, throughput
>= 1.5x). Then `--shared` requests on one adapter sharing a fresh system prompt, sent together:
prompt tokens actually prefilled (prompt minus cached) and how many times that system prompt was
computed (target: once).

Run from the repository root: python -m benchmarks.prefix_cache [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.common import PROMPTS, machine_line, make_random_adapters
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.default_model import cache_root, default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.sampling_params import SamplingParams

FILLER = ("Policies: be accurate, be brief, cite the user's own words when quoting, refuse unsafe requests, "
          "prefer metric units, and keep a friendly tone. ")


@dataclass
class ModeResult:
    ttft_by_turn: dict[int, list[float]] = field(default_factory=dict)
    wall_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


def text_of_tokens(tokenizer, text: str, tokens: int) -> str:
    """`text` repeated and cut to about `tokens` tokens."""
    ids = tokenizer.encode(text * (tokens // max(1, len(tokenizer.encode(text))) + 1), add_special_tokens=False)
    return tokenizer.decode(ids[:tokens])


def user_message(tokenizer, conversation: int, turn: int, tokens: int) -> str:
    question = PROMPTS[(conversation * 5 + turn) % len(PROMPTS)]
    return text_of_tokens(tokenizer, f"Conversation {conversation}, turn {turn}: {question} Some context follows. ",
                          tokens)


def run_conversations(engine: EngineClient, tokenizer, folders: list[Path], args, system: str) -> ModeResult:
    result = ModeResult()
    lock = threading.Lock()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def converse(index: int) -> None:
        adapter = AdapterRequest(str(folders[index % len(folders)]))
        messages = [{"role": "system", "content": system}]
        for turn in range(1, args.turns + 1):
            messages.append({"role": "user", "content": user_message(tokenizer, index, turn, args.user_tokens)})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
            started = time.perf_counter()
            first = None
            last = None
            for last in engine.submit(prompt, params, adapter):
                if first is None and last.outputs[0].token_ids:
                    first = time.perf_counter() - started
            with lock:
                result.ttft_by_turn.setdefault(turn, []).append(first)
                result.output_tokens += len(last.outputs[0].token_ids)
                result.prompt_tokens += len(prompt)
                result.cached_tokens += last.num_cached_tokens
            messages.append({"role": "assistant", "content": last.outputs[0].text})

    threads = [threading.Thread(target=converse, args=(i,)) for i in range(args.conversations)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - started
    return result


def run_shared(engine: EngineClient, tokenizer, folder: Path, args) -> tuple[int, int, int]:
    """(prefilled prompt tokens, system prompt tokens, prompt tokens outside the system prompt)."""
    system = text_of_tokens(tokenizer, "A fresh system prompt for the shared-prefix check. " + FILLER,
                            args.system_tokens)
    prompts = [tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}],
        add_generation_prompt=True, tokenize=True, return_dict=False) for i in range(args.shared)]
    head = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=True, return_dict=False)
    shared = 0  # tokens every prompt starts with: the templated system prompt
    while shared < min(len(head), *(len(p) for p in prompts)) and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    streams = [engine.submit(p, params, AdapterRequest(str(folder))) for p in prompts]
    outputs = [s.result() for s in streams]
    prefilled = sum(len(p) - o.num_cached_tokens for p, o in zip(prompts, outputs))
    return prefilled, shared, sum(len(p) - shared for p in prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--user-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--shared", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each engine core")
    parser.add_argument("--in-process", action="store_true", help="run each engine core on a thread of this process")
    parser.add_argument("--quick", action="store_true",
                        help="2 conversations x 2 turns over 2 adapters, 64-token system prompt, 4 shared: "
                        "checks the script runs")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.adapters, args.turns = 2, 2, 2
        args.system_tokens, args.user_tokens, args.max_tokens, args.shared = 64, 16, 4, 4

    model_dir = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter_dir = cache_root() / "bench-adapters"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    folders = list(make_random_adapters(model_dir, adapter_dir, args.adapters).values())
    system = text_of_tokens(tokenizer, "You are the support assistant of a bicycle shop. " + FILLER,
                            args.system_tokens)
    print(machine_line())
    print(f"{args.conversations} conversations over {args.adapters} adapters, {args.turns} turns, "
          f"system prompt {args.system_tokens} tokens, user messages {args.user_tokens} tokens, "
          f"replies {args.max_tokens} tokens")

    results: dict[str, ModeResult] = {}
    shared: dict[str, tuple[int, int, int]] = {}
    for mode, enabled in (("without cache", False), ("with cache", True)):
        config = EngineConfig(adapter_roots=[str(adapter_dir)], max_loras=args.adapters,
                              max_lora_rank=16, enable_prefix_caching=enabled, num_threads=args.threads,
                              in_process=args.in_process)
        engine = EngineClient(model_dir, config)
        try:
            # Warm every adapter (loaded into its slot) on a prompt no conversation shares.
            warm = SamplingParams(max_tokens=1, temperature=0.0)
            for f in folders:
                engine.submit(tokenizer.encode("warm up"), warm, AdapterRequest(str(f))).result()
            results[mode] = run_conversations(engine, tokenizer, folders, args, system)
            shared[mode] = run_shared(engine, tokenizer, folders[0], args)
            block_size = engine.info.block_size
        finally:
            engine.shutdown()

    last = args.turns
    print()
    print(f"{'mode':<16}{'turn-' + str(last) + ' TTFT ms (median)':>26}{'wall s':>10}{'output tok/s':>14}"
          f"{'prompt tokens':>15}{'cached':>10}")
    for mode, r in results.items():
        ttft = statistics.median(r.ttft_by_turn[last]) * 1000
        print(f"{mode:<16}{ttft:>26.1f}{r.wall_s:>10.2f}{r.output_tokens / r.wall_s:>14.1f}"
              f"{r.prompt_tokens:>15}{r.cached_tokens:>10}")
    off, on = results["without cache"], results["with cache"]
    ttft_ratio = statistics.median(off.ttft_by_turn[last]) / statistics.median(on.ttft_by_turn[last])
    throughput_ratio = (on.output_tokens / on.wall_s) / (off.output_tokens / off.wall_s)
    print(f"turn-{last} TTFT without / with cache = {ttft_ratio:.2f}x (target >= 8)")
    print(f"throughput with / without cache = {throughput_ratio:.2f}x (target >= 1.5)")
    print()
    print(f"{args.shared} requests on one adapter sharing a system prompt, sent together:")
    for mode, (prefilled, system_len, rest) in shared.items():
        extra = prefilled - system_len - rest
        print(f"{mode:<16} prefilled {prefilled} prompt tokens = system prompt once ({system_len}) + the requests' "
              f"own tokens ({rest}) + {extra} more: system prompt prefilled {1 + extra / system_len:.2f} times")
    print(f"(target with cache: once, but for the system prompt's partial last block: "
          f"< {block_size} tokens per request)")


if __name__ == "__main__":
    main()
