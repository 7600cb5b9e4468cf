"""Scale-out on Ray Serve, over loopback: 1 vs 2 engine replicas, adapter-affinity vs load-based routing.

Workload: `--adapters` random PEFT adapters (default 100) with Zipf-distributed popularity
(`--zipf`), `--requests` streaming chat requests (ignore_eos, `--max-tokens` each) sent by
`--concurrency` clients in a closed loop through the Serve ingress. Every replica gets 1 CPU
(Ray's `num_cpus=1` and one torch thread) and a host adapter cache that holds `--host-adapters`
adapters at the chosen rank, so a replica cannot keep all of them and routing decides how often
adapters are loaded again.

Three runs of one workload in one Ray cluster: 1 replica with affinity routing, 2 replicas with
affinity routing (each adapter to its owner replica by rendezvous hashing, the next one while the
owner is overloaded: `lorax_mlflow.ray.AdapterOwnerRouter`), and 2 replicas with Serve's default
load-based routing. Prints throughput, p50 time to first token and adapter loads per
request for each, then the targets: 2 replicas / 1 replica throughput >= 1.7, loads per request
affinity / load-based <= 0.6, p50 TTFT of 2 replicas no worse than 1.

`--model tiny` runs on a 2-layer random Llama (smoke test); the default is the embedded
SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import PROMPTS, machine_line
from lorax_mlflow.ray.adapter_owner import LoadBound


@dataclass
class RunResult:
    name: str
    seconds: float
    tokens: int
    ttft_ms: list[float]
    loads_by_replica: dict[str, int] = field(default_factory=dict)
    requests_by_replica: Counter = field(default_factory=Counter)
    requests: int = 0
    failures: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def loads_per_request(self) -> float:
        return sum(self.loads_by_replica.values()) / max(self.requests, 1)

    @property
    def busiest_share(self) -> float:
        """Share of the answered requests that the busiest replica answered."""
        return max(self.requests_by_replica.values()) / max(sum(self.requests_by_replica.values()), 1)

    @property
    def p50_ttft_ms(self) -> float:
        return statistics.median(self.ttft_ms) if self.ttft_ms else float("nan")


def zipf_workload(adapters: list[str], requests: int, exponent: float, seed: int = 0) -> list[str]:
    """The adapter of each request: adapter k (1-based popularity rank) with weight 1 / k^exponent."""
    weights = [1 / (rank ** exponent) for rank in range(1, len(adapters) + 1)]
    return random.Random(seed).choices(adapters, weights=weights, k=requests)


def base_and_adapters(args: argparse.Namespace, work: Path) -> tuple[str | None, list[Path]]:
    """(base model reference for save_model, the adapter folders)."""
    from benchmarks.adapters import make_adapters
    from lorax_mlflow.default_model import cache_root, default_model_path

    if args.model == "tiny":
        from tests.helpers import build_tiny_model

        base_dir = build_tiny_model(work / "tiny-llama")
        return str(base_dir), make_adapters(base_dir, work / "adapters", args.adapters, args.rank)
    base_dir = default_model_path()
    folder = cache_root() / "bench-adapters" / f"scale-out-r{args.rank}"
    return None, make_adapters(base_dir, folder, args.adapters, args.rank)


def save_served_model(base: str | None, adapters: list[Path], args: argparse.Namespace, work: Path) -> Path:
    """The MLflow model every replica loads: the base, adapters reachable by path, a host cache sized
    to `--host-adapters` adapters (one adapter's fp32 weights are its safetensors file, header aside)."""
    import lorax_mlflow

    adapter_bytes = (adapters[0] / "adapter_model.safetensors").stat().st_size
    path = work / "served-model"
    lorax_mlflow.save_model(
        path, base_model=base, adapter_roots=[adapters[0].parent],
        engine_config={"max_lora_rank": args.rank, "max_loras": args.slots,
                       "host_cache_bytes": args.host_adapters * adapter_bytes,
                       "kv_cache_bytes": args.kv_cache_mib << 20, "max_model_len": 512, "num_threads": 1},
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def drive(url: str, workload: list[str], args: argparse.Namespace, name: str) -> RunResult:
    """Closed loop: `concurrency` clients, each sending its next request when the last one ends."""
    from lorax_mlflow.ray import ADAPTER_LOADS_HEADER, REPLICA_HEADER

    result = RunResult(name, 0.0, 0, [], requests=len(workload))
    pending = iter(enumerate(workload))

    def note_loads(headers: httpx.Headers) -> None:
        replica = headers.get(REPLICA_HEADER)
        if replica is not None:
            loads = int(headers[ADAPTER_LOADS_HEADER])
            result.loads_by_replica[replica] = max(result.loads_by_replica.get(replica, 0), loads)

    async def client(http: httpx.AsyncClient) -> None:
        for index, adapter in pending:
            body = {"model": adapter, "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                    "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
            sent = time.perf_counter()
            first = None
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    result.failures += 1
                    await response.aread()
                    continue
                note_loads(response.headers)
                result.requests_by_replica[response.headers.get(REPLICA_HEADER)] += 1
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result.failures += 1
                        break
                    if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                        first = time.perf_counter()
                        result.ttft_ms.append((first - sent) * 1000)
            result.tokens += args.max_tokens

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        result.seconds = time.perf_counter() - started
        for _ in range(8 * len(result.loads_by_replica) + 8):  # final counters of every replica
            note_loads((await http.get(url + "/health")).headers)
    return result


def run_config(model_path: Path, name: str, replicas: int, affinity: bool, workload: list[str],
               args: argparse.Namespace, port: int) -> RunResult:
    from ray import serve

    from lorax_mlflow.ray import build_app

    app = build_app(str(model_path), replicas=replicas, num_cpus_per_replica=1, affinity=affinity,
                    overload_slack=args.overload_slack, overload_ratio=args.overload_ratio,
                    max_ongoing_requests=max(args.concurrency, 8), engine_env={"LORAX_NUM_THREADS": "1"})
    started = time.perf_counter()
    serve.run(app, name="scale-out", route_prefix="/")
    logging.getLogger(__name__).warning("%s: deployed in %.0f s", name, time.perf_counter() - started)
    url = f"http://127.0.0.1:{port}"
    warm = asyncio.run(drive(url, [""] * args.concurrency, _short(args), name))  # first-use costs, base only
    assert warm.failures == 0, f"{name}: warm-up requests failed"
    result = asyncio.run(drive(url, workload, args, name))
    serve.delete("scale-out")
    return result


def _short(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "max_tokens": 2})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--host-adapters", type=int, default=30, help="adapters one replica's host cache holds")
    parser.add_argument("--slots", type=int, default=8, help="device slots per replica")
    parser.add_argument("--kv-cache-mib", type=int, default=64)
    parser.add_argument("--overload-slack", type=int, default=LoadBound.slack,
                        help="affinity routing leaves an adapter's owner when it carries more than this many requests "
                             "above the least-loaded replica...")
    parser.add_argument("--overload-ratio", type=float, default=LoadBound.ratio,
                        help="...and more than this times the least-loaded replica's requests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    from lorax_mlflow.ray import start_local_cluster

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, adapters = base_and_adapters(args, work)
        model_path = save_served_model(base, adapters, args, work)
        workload = zipf_workload([str(a) for a in adapters], args.requests, args.zipf)
        port = free_port()
        start_local_cluster(num_cpus=2)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            runs = [
                run_config(model_path, "1 replica, affinity routing", 1, True, workload, args, port),
                run_config(model_path, "2 replicas, affinity routing", 2, True, workload, args, port),
                run_config(model_path, "2 replicas, load-based routing", 2, False, workload, args, port),
            ]
        finally:
            serve.shutdown()
            ray.shutdown()

    distinct = len(set(workload))
    print(f"\nScale-out on Ray Serve over loopback: {args.model} model, {args.adapters} rank-{args.rank} adapters "
          f"(Zipf s={args.zipf}, {distinct} distinct in {args.requests} requests), {args.concurrency} streaming "
          f"clients, {args.max_tokens} tokens each; 1 CPU per replica, host cache {args.host_adapters} adapters, "
          f"{args.slots} slots; affinity leaves an owner over {args.overload_slack} requests and "
          f"{args.overload_ratio}x above the least-loaded replica")
    print(f"machine: {machine_line()}; Serve proxy, ingress and this client share the same cores as the replicas")
    print(f"{'run':<32} {'tokens/s':>9} {'p50 TTFT ms':>12} {'adapter loads/request':>22} {'busiest replica':>16} "
          f"{'failed':>7}")
    for run in runs:
        print(f"{run.name:<32} {run.tokens_per_s:>9.1f} {run.p50_ttft_ms:>12.1f} {run.loads_per_request:>22.3f} "
              f"{run.busiest_share:>15.0%} {run.failures:>7}")
    one, two, spread = runs
    print(f"2 replicas / 1 replica throughput = {two.tokens_per_s / one.tokens_per_s:.2f} (target >= 1.7)")
    ratio = two.loads_per_request / spread.loads_per_request if spread.loads_per_request else float("nan")
    print(f"adapter loads per request, affinity / load-based = {ratio:.2f} (target <= 0.6)")
    print(f"p50 TTFT 2 replicas / 1 replica = {two.p50_ttft_ms / one.p50_ttft_ms:.2f} (target <= 1.0)")
    print(f"p50 TTFT affinity / load-based = {two.p50_ttft_ms / spread.p50_ttft_ms:.2f} (target <= 1.0)")
    print(f"cores: {os.cpu_count()}; 2 replicas x 1 core leave no core for Serve's proxy, the ingress and the "
          "client on a 2-core machine")


if __name__ == "__main__":
    main()
