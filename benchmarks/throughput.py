"""Multi-adapter throughput through every surface, all rows measured in the same run (default model,
on the engine's device and dtype; the header names both and PEFT runs on the same).

`--requests` concurrent chat requests x `--max-tokens` new tokens (greedy, ignore_eos: equal token
counts everywhere), base-only and spread over `--adapters` random r=`--rank` adapters on all 7
projections, every adapter warm. Rows:

  engine client       EngineClient.submit, the core in its own process, for each `--core-threads` (their
                      rounds interleaved, so a burst of load hits each thread count alike)
  in-process thread   the core on a thread of this process (1 torch thread): the path before the split
  predict()           mlflow.pyfunc.load_model(...).predict from `--requests` threads
  HTTP server         `lorax-mlflow serve` (a subprocess), `--requests` concurrent SSE chat streams
  PEFT                mixed-batch generate(adapter_names=...), padded, this process's main thread
  vLLM-CPU            offline LLM.generate in /tmp/vllm-venv (a subprocess), when that venv exists, in
                      bf16 (the issues' setting) and fp32; the ratios take the faster of the two

The decode step (in-process, 1 thread) is printed against two floors measured in the same run: its
memory roofline (bytes read / copy bandwidth) and its compute floor (multiply-adds / the FLOP/s of a
decode-shaped GEMM); the larger of the two is the roofline.
Then the ratios of the engine-core issue's targets (predict() and HTTP mixed >= 0.9x the engine
client's mixed; predict() mixed >= 1.0x vLLM-CPU mixed and >= 2x PEFT mixed; core with 2 threads
>= 1.3x 1 thread) and of the step-cost issue's (predict() mixed >= 1.5x vLLM mixed, base-only >= 1.0x
vLLM base-only, mixed / base-only >= 0.85, mixed >= 3x PEFT, decode step <= 3x its roofline).
Run from the repository root: python -m benchmarks.throughput [--quick] (the step-cost issue's
workload is --max-tokens 64)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorax_mlflow
from benchmarks.common import PROMPTS, device_label, machine_line, make_random_adapters
from benchmarks.gpu_throughput import compute_floor_seconds, gemm_flops_per_s, roofline_seconds, timed_decode_steps
from benchmarks.kernels import copy_bandwidth_bytes_per_ms
from benchmarks.serving import free_port, start_process, stop_process
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.default_model import cache_root, default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.sampling_params import SamplingParams

VLLM_PYTHON = Path("/tmp/vllm-venv/bin/python")
Rate = Callable[[list[str]], float]
"""Output tokens/s for one round of requests; request i uses adapter `names[i]` ("" = base)."""


def chat_messages(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(count)]


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
            for m in chat_messages(count)]


def timed(run: Callable[[], int]) -> float:
    started = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - started)


# ----- our surfaces --------------------------------------------------------------------------------


def client_rate(client: EngineClient, prompts: list[list[int]], folders: dict[str, Path], max_tokens: int) -> Rate:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def rate(names: list[str]) -> float:
        def run() -> int:
            streams = [client.submit(p, params, AdapterRequest(str(folders[n])) if n else None)
                       for p, n in zip(prompts, names)]
            return sum(len(s.result().outputs[0].token_ids) for s in streams)

        return timed(run)

    return rate


def predict_rate(model, max_tokens: int) -> Rate:
    def rate(names: list[str]) -> float:
        counts = [0] * len(names)
        messages = chat_messages(len(names))

        def call(i: int) -> None:
            response = model.predict({"messages": messages[i], "max_tokens": max_tokens, "temperature": 0.0,
                                      "custom_inputs": {"adapter_id": names[i], "ignore_eos": True}})
            counts[i] = response["usage"]["completion_tokens"]

        def run() -> int:
            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(names))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return sum(counts)

        return timed(run)

    return rate


def http_rate(url: str, max_tokens: int) -> Rate:
    def rate(names: list[str]) -> float:
        messages = chat_messages(len(names))

        async def stream(client: httpx.AsyncClient, i: int) -> int:
            body = {"model": names[i], "messages": messages[i], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            tokens = 0
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
            return tokens

        async def go() -> float:
            limits = httpx.Limits(max_connections=len(names), max_keepalive_connections=len(names))
            async with httpx.AsyncClient(timeout=600, limits=limits) as client:
                started = time.perf_counter()
                tokens = sum(await asyncio.gather(*(stream(client, i) for i in range(len(names)))))
                return tokens / (time.perf_counter() - started)

        return asyncio.run(go())

    return rate


# ----- peers ---------------------------------------------------------------------------------------


def peft_mixed_rate(base: Path, folders: dict[str, Path], tokenizer, prompts, names: list[str],
                    max_tokens: int, device_name: str, dtype_name: str) -> float:
    from peft import PeftModel

    config = EngineConfig(device=device_name, dtype=dtype_name)
    device = config.resolved_device()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=config.resolved_dtype()).to(device).eval()
    ordered = sorted(folders)
    peft_model = PeftModel.from_pretrained(model, folders[ordered[0]], adapter_name=ordered[0])
    for name in ordered[1:]:
        peft_model.load_adapter(folders[name], adapter_name=name)
    peft_model.eval()
    tokenizer.padding_side = "left"
    batch = tokenizer([tokenizer.decode(p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)

    def run() -> int:
        with torch.no_grad():
            out = peft_model.generate(**batch, adapter_names=names, max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)

    return timed(run)


def vllm_rates(base: Path, folders: dict[str, Path], prompts, names: list[str], args,
               dtype: str) -> dict[str, float] | None:
    if not VLLM_PYTHON.exists():
        return None
    job = {"base": str(base), "adapters": {n: str(f) for n, f in folders.items()}, "prompts": prompts,
           "per_request": names, "max_tokens": args.max_tokens, "rank": args.rank, "dtype": dtype}
    script = Path(__file__).parent / "peers" / "vllm_throughput.py"
    done = subprocess.run([str(VLLM_PYTHON), str(script)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        print(f"vLLM-CPU failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    result = [line for line in done.stdout.splitlines() if line.startswith("{")]  # vLLM logs to stdout too
    return json.loads(result[-1])


# ----- run -----------------------------------------------------------------------------------------


def measure(rate: Rate, names: list[str], base_names: list[str], repeats: int) -> dict[str, float]:
    """Median tokens/s of `repeats` rounds, base-only and mixed, after one short warm-up round."""
    return measure_interleaved({"": rate}, names, base_names, repeats)[""]


def measure_interleaved(rates: dict[str, Rate], names: list[str], base_names: list[str],
                        repeats: int) -> dict[str, dict[str, float]]:
    """`measure` for several rows at once, their rounds interleaved (A, B, A, B, ...): a burst of load on
    the shared machine then hits every row alike instead of deciding a ratio between rows."""
    for rate in rates.values():
        rate(list(dict.fromkeys(names)))  # warm-up: every adapter loaded once
    runs: dict[str, dict[str, list[float]]] = {row: {"base_only": [], "mixed": []} for row in rates}
    for _ in range(repeats):
        for row, rate in rates.items():
            runs[row]["base_only"].append(rate(base_names))
            runs[row]["mixed"].append(rate(names))
    return {row: {kind: sorted(values)[len(values) // 2] for kind, values in kinds.items()}
            for row, kinds in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per row (the median is printed)")
    parser.add_argument("--core-threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the core process, one engine-client row each")
    parser.add_argument("--quick", action="store_true", help="4 requests x 8 tokens, 2 adapters, 1 round: "
                        "checks that every row runs")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--device", default="auto", help="engine and PEFT device (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="engine and PEFT dtype (auto: the engine's default)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.adapters, args.repeats = 4, 8, 2, 1
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    base = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapter_dir = cache_root() / "bench-adapters" / f"r{args.rank}"
    folders = make_random_adapters(base, adapter_dir, args.adapters, args.rank)
    ordered = sorted(folders)
    names = [ordered[i % len(ordered)] for i in range(args.requests)]
    base_names = [""] * args.requests
    prompts = chat_prompts(tokenizer, args.requests)
    engine_config = {"max_loras": args.adapters, "max_lora_rank": args.rank, "adapter_roots": [str(adapter_dir)],
                     "device": args.device, "dtype": args.dtype}
    rows: dict[str, dict[str, float] | None] = {}
    step_lines: list[str] = []

    clients = {f"engine client, core {threads} thr": EngineClient(base, EngineConfig(**engine_config, num_threads=threads))
               for threads in args.core_threads}  # idle cores block: the one not measured costs nothing
    rows.update(measure_interleaved({row: client_rate(client, prompts, folders, args.max_tokens)
                                     for row, client in clients.items()}, names, base_names, args.repeats))
    for client in clients.values():
        client.shutdown()
    client = EngineClient(base, EngineConfig(**engine_config, num_threads=1, in_process=True))
    rate = client_rate(client, prompts, folders, args.max_tokens)
    rows["in-process thread, 1 thr"] = measure(rate, names, base_names, args.repeats)
    runner = client.core.runner  # in-process: the decode steps can be timed against their roofline
    bandwidth = copy_bandwidth_bytes_per_ms(runner.device, repeats=5) * 1e3
    hidden, intermediate = runner.hf_config.hidden_size, runner.hf_config.intermediate_size
    threads_here = torch.get_num_threads()
    torch.set_num_threads(1)  # the rate of the GEMM at the steps' own thread count
    gemm_rate = gemm_flops_per_s(runner.device, runner.dtype, len(prompts), hidden, 2 * intermediate)
    torch.set_num_threads(threads_here)  # PEFT, later in this process, keeps every core
    for label, round_names in (("in-process, base only", base_names), (f"in-process, {args.adapters} adapters", names)):
        with timed_decode_steps(runner, len(prompts)) as steps:
            rate(round_names)
        if steps:
            median = sorted(steps, key=lambda step: step.seconds)[len(steps) // 2]
            memory = roofline_seconds(median, runner, args.rank, bandwidth)
            compute = compute_floor_seconds(median, runner, args.rank, gemm_rate)
            step_lines.append(f"{label:<32} {median.seconds * 1e3:>15.2f} {memory * 1e3:>10.2f} "
                              f"{compute * 1e3:>11.2f} {median.seconds / max(memory, compute):>14.2f}")
    step_lines.insert(0, f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, decode-shaped GEMM "
                         f"[{len(prompts)}x{hidden}]x[{hidden}x{2 * intermediate}] {gemm_rate / 1e9:.1f} GFLOP/s")
    client.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "throughput-model"
        lorax_mlflow.save_model(model_path, adapters=folders, engine_config=engine_config)
        import mlflow

        from lorax_mlflow.chat_model import unwrap_chat_model

        model = mlflow.pyfunc.load_model(str(model_path))
        rows[f"predict(), {args.requests} threads"] = measure(predict_rate(model, args.max_tokens), names, base_names,
                                                              args.repeats)
        unwrap_chat_model(model).service.engine.shutdown()

        port = free_port()
        server = start_process([sys.executable, "-m", "lorax_mlflow.cli", "serve", "-m", str(model_path),
                                "--port", str(port), "--log-level", "warning"], f"http://127.0.0.1:{port}/health")
        try:
            rows[f"HTTP, {args.requests} SSE streams"] = measure(
                http_rate(f"http://127.0.0.1:{port}", args.max_tokens), names, base_names, args.repeats)
        finally:
            stop_process(server)

    if not args.skip_peft:
        peft = [peft_mixed_rate(base, folders, tokenizer, prompts, names, args.max_tokens, args.device, args.dtype) for _ in range(args.repeats)]
        rows["PEFT mixed-batch generate"] = {"mixed": sorted(peft)[len(peft) // 2]}
    for dtype in ("bfloat16", "float32"):
        rows[f"vLLM-CPU ({dtype}, offline)"] = vllm_rates(base, folders, prompts, names, args, dtype)

    report(rows, step_lines, args)


def report(rows: dict[str, dict[str, float] | None], step_lines: list[str], args) -> None:
    print(f"\n{args.requests} concurrent chat requests x {args.max_tokens} new tokens, {args.adapters} adapters "
          f"r={args.rank} (all 7 projections), SmolLM2-135M, "
          f"{device_label(EngineConfig(device=args.device).resolved_device(), EngineConfig(device=args.device, dtype=args.dtype).resolved_dtype())}, "
          f"median of {args.repeats}; "
          f"{machine_line()}")
    print(f"{'path':<32} {'base-only tok/s':>16} {'mixed tok/s':>12}")

    def cell(row: dict[str, float] | None, kind: str) -> str:
        if row is None:
            return "skipped"
        return f"{row[kind]:.1f}" if kind in row else "-"

    for name, row in rows.items():
        print(f"{name:<32} {cell(row, 'base_only'):>16} {cell(row, 'mixed'):>12}")

    def best(prefix: str, kind: str) -> float | None:
        """The fastest row starting with `prefix` (vLLM: the better of its two dtypes)."""
        values = [row[kind] for name, row in rows.items() if name.startswith(prefix) and row and kind in row]
        return max(values) if values else None

    def mixed(prefix: str) -> float | None:
        return best(prefix, "mixed")

    threads = args.core_threads
    client = mixed(f"engine client, core {max(threads)} thr")
    ratios = [
        ("predict() mixed / engine client mixed", mixed("predict()"), client, 0.9),
        ("HTTP mixed / engine client mixed", mixed("HTTP"), client, 0.9),
        ("predict() mixed / vLLM-CPU mixed", mixed("predict()"), mixed("vLLM-CPU"), 1.0),
        ("predict() mixed / PEFT mixed", mixed("predict()"), mixed("PEFT"), 2.0),
        (f"core {max(threads)} thr mixed / core {min(threads)} thr mixed", client,
         mixed(f"engine client, core {min(threads)} thr"), 1.3),
        ("engine client mixed / in-process thread mixed", client, mixed("in-process thread"), None),
        ("step cost: predict() mixed / vLLM-CPU mixed", mixed("predict()"), mixed("vLLM-CPU"), 1.5),
        ("step cost: predict() base-only / vLLM-CPU base-only", best("predict()", "base_only"),
         best("vLLM-CPU", "base_only"), 1.0),
        ("step cost: predict() mixed / predict() base-only", mixed("predict()"), best("predict()", "base_only"), 0.85),
        ("step cost: predict() mixed / PEFT mixed", mixed("predict()"), mixed("PEFT"), 3.0),
    ]
    if step_lines:
        print(f"\ndecode step (all {args.requests} sequences, in-process, 1 thread, median) against its floors: "
              "memory = weights + KV + active adapters read / copy bandwidth; compute = multiply-adds / GEMM "
              "rate; roofline = the larger (target: step <= 3x)")
        print(step_lines[0])
        print(f"{'run':<32} {'decode step ms':>15} {'memory ms':>10} {'compute ms':>11} {'step/roofline':>14}")
        for line in step_lines[1:]:
            print(line)
    print()
    for name, top, bottom, target in ratios:
        goal = f" (target >= {target})" if target is not None else ""
        value = "skipped" if top is None or bottom is None else f"{top / bottom:.2f}x"
        print(f"{name:<52} {value}{goal}")


if __name__ == "__main__":
    main()
