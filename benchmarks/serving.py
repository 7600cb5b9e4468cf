"""Serving benchmark: the HTTP layer against the engine's own throughput, and against `mlflow models serve`.

One load, three targets, all measured in the same run on the embedded default model (SmolLM2-135M)
with 8 random r=16 adapters: `--requests` chat requests, `--concurrency` in flight at once, request i
on adapter i % 8, greedy with exactly `--max-tokens` new tokens each.

  server   `lorax-mlflow serve` (a subprocess), streaming /v1/chat/completions with an asyncio client
  engine   the same requests submitted straight to the engine (LoraxService in this process)
  mlflow   `mlflow models serve --env-manager local` (a subprocess), non-streaming /invocations

Prints requests/s, output tokens/s, time to first token p50/p99 and inter-token latency p50/p99,
then the ratios server/engine (target >= 0.9) and server/mlflow.

`--long-prompt` runs the long-prompt case instead, through the server: `--streams` streams are
decoding when one ~`--long-tokens`-token prompt arrives. Prints the long request's time to first
token alone and under that load (target: <= 1.5x), and the streams' largest inter-token gap
against their median gap (target: <= 3x; without chunked prefill every stream stalls for the
whole prefill).
Run from the repository root: python -m benchmarks.serving [--requests 64 --max-tokens 32] [--long-prompt]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import lorax_mlflow
from benchmarks.common import PROMPTS, machine_line, make_random_adapters
from lorax_mlflow.api.chat_request import chat_request
from lorax_mlflow.api.schemas import ChatCompletionRequest, parse_request
from lorax_mlflow.default_model import cache_root, default_model_path


@dataclass
class RequestTiming:
    started: float
    token_times: list[float] = field(default_factory=list)
    """Arrival time of each piece of output (a stream chunk; the whole answer when not streaming)."""
    output_tokens: int = 0


@dataclass
class LoadResult:
    name: str
    seconds: float
    timings: list[RequestTiming]

    @property
    def requests_per_s(self) -> float:
        return len(self.timings) / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return sum(t.output_tokens for t in self.timings) / self.seconds

    def ttft_ms(self) -> list[float]:
        return [(t.token_times[0] - t.started) * 1000 for t in self.timings]

    def itl_ms(self) -> list[float]:
        return [(b - a) * 1000 for t in self.timings for a, b in zip(t.token_times, t.token_times[1:])]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def chat_body(index: int, adapters: list[str], max_tokens: int) -> dict:
    return {
        "model": adapters[index % len(adapters)],
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def run_load(name: str, send: Callable[[int, RequestTiming], Awaitable[None]], requests: int,
                   concurrency: int) -> LoadResult:
    gate = asyncio.Semaphore(concurrency)
    timings = [RequestTiming(0.0) for _ in range(requests)]

    async def one(index: int) -> None:
        async with gate:
            timings[index].started = time.perf_counter()
            await send(index, timings[index])

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return LoadResult(name, time.perf_counter() - started, timings)


# ----- the three targets ---------------------------------------------------------------------------


def streaming_chat_sender(client: httpx.AsyncClient, url: str, adapters: list[str], max_tokens: int):
    async def send(index: int, timing: RequestTiming) -> None:
        body = {**chat_body(index, adapters, max_tokens), "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    timing.output_tokens = chunk["usage"]["completion_tokens"]
                elif any(c["delta"].get("content") for c in chunk["choices"]):
                    timing.token_times.append(time.perf_counter())

    return send


def invocations_sender(client: httpx.AsyncClient, url: str, adapters: list[str], max_tokens: int):
    async def send(index: int, timing: RequestTiming) -> None:
        chat = chat_body(index, adapters, max_tokens)
        body = {"messages": chat["messages"], "max_tokens": max_tokens, "temperature": 0.0,
                "custom_inputs": {"adapter_id": chat["model"], "ignore_eos": True}}
        response = await client.post(url + "/invocations", json=body)
        response.raise_for_status()
        timing.token_times.append(time.perf_counter())
        timing.output_tokens = response.json()["usage"]["completion_tokens"]

    return send


def engine_sender(service, adapters: list[str], max_tokens: int):
    async def send(index: int, timing: RequestTiming) -> None:
        chat = chat_body(index, adapters, max_tokens)
        request = parse_request(ChatCompletionRequest, chat)
        prepared = await asyncio.to_thread(chat_request, service, request, model=request.model)
        last = None
        async for output in service.submit(prepared, loop=asyncio.get_running_loop()):
            if output.outputs[0].delta_text:
                timing.token_times.append(time.perf_counter())
            last = output
        timing.output_tokens = last.num_completion_tokens

    return send


# ----- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_process(command: list[str], health_url: str, timeout: float = 300,
                  env: dict[str, str] | None = None) -> subprocess.Popen:
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{command[0:4]} exited:\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"{command} did not become healthy")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


async def against_http(name: str, url: str, make_sender, args, adapters: list[str]) -> LoadResult:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        send = make_sender(client, url, adapters, args.max_tokens)
        for i in range(len(adapters)):  # warm-up: every adapter loaded once, first-call costs paid
            await send(i, RequestTiming(time.perf_counter()))
        return await run_load(name, send, args.requests, args.concurrency)


def run_server(model_path: Path, args, adapters: list[str]) -> LoadResult:
    port = free_port()
    command = [sys.executable, "-m", "lorax_mlflow.cli", "serve", "-m", str(model_path), "--port", str(port),
               "--log-level", "warning"]
    process = start_process(command, f"http://127.0.0.1:{port}/health")
    try:
        return asyncio.run(against_http("server (SSE)", f"http://127.0.0.1:{port}", streaming_chat_sender, args,
                                        adapters))
    finally:
        stop_process(process)


def run_mlflow(model_path: Path, args, adapters: list[str]) -> LoadResult:
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_path), "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    # its default 60 s request timeout would answer 504 to requests queued behind the others
    process = start_process(command, f"http://127.0.0.1:{port}/ping",
                            env={"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "3600"})
    try:
        return asyncio.run(against_http("mlflow /invocations", f"http://127.0.0.1:{port}", invocations_sender, args,
                                        adapters))
    finally:
        stop_process(process)


def run_engine(model_path: Path, args, adapters: list[str]) -> LoadResult:
    from lorax_mlflow.server import load_served_model

    served = load_served_model(str(model_path))
    try:
        async def go() -> LoadResult:
            send = engine_sender(served.service, adapters, args.max_tokens)
            for i in range(len(adapters)):
                await send(i, RequestTiming(time.perf_counter()))
            return await run_load("engine (direct)", send, args.requests, args.concurrency)

        return asyncio.run(go())
    finally:
        served.service.engine.shutdown()


# ----- long prompt under load ----------------------------------------------------------------------


def long_prompt_text(tokens: int, salt: str) -> str:
    """A user message of about `tokens` tokens for the default model's tokenizer, starting with `salt`
    so that no two long requests share a prefix-cache block."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    sentence = "The quick brown fox jumps over the lazy dog while the river keeps flowing past the old mill. "
    ids = tokenizer.encode(f"Request {salt}. " + sentence * (tokens // 10 + 10))[:tokens]
    return tokenizer.decode(ids)


@dataclass
class LongPromptResult:
    ttft_alone_s: float
    ttft_loaded_s: float
    stream_median_gap_ms: float
    stream_max_gap_ms: float


async def long_prompt_case(url: str, args, adapters: list[str]) -> LongPromptResult:
    texts = {salt: long_prompt_text(args.long_tokens, salt) for salt in ("warm-up", "alone", "under load")}
    limits = httpx.Limits(max_connections=args.streams + 2, max_keepalive_connections=args.streams + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        send = streaming_chat_sender(client, url, adapters, args.max_tokens)

        async def long_request(timing: RequestTiming, salt: str) -> None:
            body = {"model": adapters[0], "messages": [{"role": "user", "content": texts[salt]}], "max_tokens": 4,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]" and not timing.token_times:
                        chunk = json.loads(line[6:])
                        if any(c["delta"].get("content") for c in chunk["choices"]):
                            timing.token_times.append(time.perf_counter())

        for i in range(len(adapters)):  # warm-up: adapters loaded, first-call costs paid
            await send(i, RequestTiming(time.perf_counter()))
        await long_request(RequestTiming(time.perf_counter()), "warm-up")
        alone = RequestTiming(time.perf_counter())
        await long_request(alone, "alone")

        streams = [RequestTiming(time.perf_counter()) for _ in range(args.streams)]
        tasks = [asyncio.create_task(send(i, streams[i])) for i in range(args.streams)]
        while min(len(t.token_times) for t in streams) < 4:  # every stream is decoding
            await asyncio.sleep(0.05)
        loaded = RequestTiming(time.perf_counter())
        await long_request(loaded, "under load")
        await asyncio.gather(*tasks)

    gaps = [(b - a) * 1000 for t in streams for a, b in zip(t.token_times[1:], t.token_times[2:])]
    return LongPromptResult(
        ttft_alone_s=alone.token_times[0] - alone.started,
        ttft_loaded_s=loaded.token_times[0] - loaded.started,
        stream_median_gap_ms=percentile(gaps, 50),
        stream_max_gap_ms=max(gaps),
    )


def run_long_prompt(model_path: Path, args, adapters: list[str]) -> LongPromptResult:
    port = free_port()
    command = [sys.executable, "-m", "lorax_mlflow.cli", "serve", "-m", str(model_path), "--port", str(port),
               "--log-level", "warning", *shlex.split(args.server_args)]
    process = start_process(command, f"http://127.0.0.1:{port}/health")
    try:
        return asyncio.run(long_prompt_case(f"http://127.0.0.1:{port}", args, adapters))
    finally:
        stop_process(process)


def print_long_prompt(result: LongPromptResult, args) -> None:
    print(f"{args.streams} streams decoding ({args.max_tokens} tokens each), one {args.long_tokens}-token prompt "
          f"arrives (server, SSE)")
    print(f"long request TTFT: alone {result.ttft_alone_s:.2f}s, under load {result.ttft_loaded_s:.2f}s "
          f"-> {result.ttft_loaded_s / result.ttft_alone_s:.2f}x (target <= 1.5)")
    print(f"streams' inter-token gap: median {result.stream_median_gap_ms:.0f}ms, largest "
          f"{result.stream_max_gap_ms:.0f}ms -> {result.stream_max_gap_ms / result.stream_median_gap_ms:.2f}x "
          f"(target <= 3)")


# ----- report --------------------------------------------------------------------------------------


def ms(value: float) -> str:
    return "-" if value != value else f"{value:.0f}ms"  # NaN: no inter-token gaps without streaming


def print_table(results: list[LoadResult]) -> None:
    header = f"{'target':<22}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        ttft, itl = r.ttft_ms(), r.itl_ms()
        print(f"{r.name:<22}{r.requests_per_s:>8.2f}{r.tokens_per_s:>11.1f}{ms(percentile(ttft, 50)):>10}"
              f"{ms(percentile(ttft, 99)):>10}{ms(percentile(itl, 50)):>9}{ms(percentile(itl, 99)):>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-mlflow", action="store_true", help="leave out `mlflow models serve`")
    parser.add_argument("--long-prompt", action="store_true", help="run the long-prompt-under-load case instead")
    parser.add_argument("--streams", type=int, default=16, help="long-prompt case: decoding streams")
    parser.add_argument("--long-tokens", type=int, default=1500, help="long-prompt case: prompt tokens")
    parser.add_argument("--server-args", default="",
                        help='extra `lorax-mlflow serve` flags, e.g. --server-args="--prefill-chunk-tokens 128"')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    base = default_model_path()
    adapter_dirs = make_random_adapters(base, cache_root() / "bench-adapters" / f"r{args.rank}", args.adapters,
                                        rank=args.rank)
    adapters = sorted(adapter_dirs)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "serving-bench-model"
        lorax_mlflow.save_model(model_path, adapters=adapter_dirs, engine_config={"max_loras": args.adapters,
                                                                                  "max_lora_rank": args.rank})
        if args.long_prompt:
            result = run_long_prompt(model_path, args, adapters)
            print(f"\n{machine_line()}")
            print_long_prompt(result, args)
            return
        results = [run_server(model_path, args, adapters), run_engine(model_path, args, adapters)]
        if not args.skip_mlflow:
            results.append(run_mlflow(model_path, args, adapters))

    print(f"\n{machine_line()}")
    print(f"SmolLM2-135M-Instruct, {args.requests} chat requests, {args.concurrency} concurrent, "
          f"{args.adapters} adapters r={args.rank}, {args.max_tokens} new tokens each (greedy, ignore_eos)\n")
    print_table(results)
    server, engine = results[0], results[1]
    print(f"\nserver / engine output tokens/s: {server.tokens_per_s / engine.tokens_per_s:.2f}x (target >= 0.90)")
    if not args.skip_mlflow:
        mlflow_result = results[2]
        print(f"server / mlflow models serve output tokens/s: {server.tokens_per_s / mlflow_result.tokens_per_s:.2f}x")
        print(f"server / mlflow models serve requests/s: {server.requests_per_s / mlflow_result.requests_per_s:.2f}x")


if __name__ == "__main__":
    main()
