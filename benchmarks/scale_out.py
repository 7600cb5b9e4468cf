"""Scale-out on Ray Serve, over loopback: 1 vs 2 engine replicas, adapter-affinity vs load-based routing.

Workload: `--adapters` random PEFT adapters (default 100) with Zipf-distributed popularity
(`--zipf`), one stream of `--warmup` + `--requests` streaming chat requests (ignore_eos,
`--max-tokens` each) sent by `--concurrency` clients in a closed loop through the Serve ingress.
Every replica gets 1 CPU (Ray's `num_cpus=1` and one torch thread) and a host adapter cache that
holds `--host-adapters` adapters at the chosen rank, so a replica cannot keep all of them and
routing decides how often adapters are loaded again.

Three runs of one workload in one Ray cluster: 1 replica with affinity routing, 2 replicas with
affinity routing (each adapter to its owner replica by rendezvous hashing, the next one while the
owner is overloaded: `lorax_mlflow.ray.AdapterOwnerRouter`), and 2 replicas with Serve's default
load-based routing.

Each run has two phases, as a long-running server sees them. The warm-up phase (the stream's first
`--warmup` requests, neither timed nor counted in the measured rates) fills the replicas' adapter
caches: every adapter's first load happens under any routing, so over a short cold run these
compulsory loads hide what routing does. The measured phase (the next `--requests`, on the same
replicas) gives throughput, p50 time to first token and adapter loads per request. A routing-only
simulation of this workload (30-adapter LRU per replica, owner by hash vs a random replica, no
overload fallback) needs about 250 requests (p90: 320) before both affinity replicas' caches are
full, and puts the loads ratio affinity / load-based at 0.64 over 400 cold requests, 0.42 over 400
requests after 400 warm-up requests and 0.41 in the long run: hence the defaults of 400 + 400.

Prints per run the measured phase's throughput, p50 TTFT and loads per request, and loads per
request over all requests, warm-up included (the cold-start cost stays visible); then the
targets: 2 replicas / 1 replica throughput >= 1.7, measured loads per request affinity /
load-based <= 0.6, p50 TTFT of 2 replicas no worse than 1 and affinity no worse than load-based.

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
class Phase:
    """One closed-loop pass over a list of requests."""

    seconds: float
    tokens: int
    ttft_ms: list[float]
    loads_by_replica: dict[str, int] = field(default_factory=dict)
    """Each replica's adapter-load counter at the end of the phase (counted since the replica started)."""
    requests_by_replica: Counter = field(default_factory=Counter)
    requests: int = 0
    failures: int = 0

    @property
    def loads(self) -> int:
        return sum(self.loads_by_replica.values())


@dataclass
class RunResult:
    """One configuration: the warm-up phase, then the measured phase on the same replicas."""

    name: str
    warmup: Phase
    measured: Phase

    @property
    def tokens_per_s(self) -> float:
        return self.measured.tokens / self.measured.seconds

    @property
    def loads_per_request(self) -> float:
        """Adapter loads per request of the measured phase (caches already warm)."""
        return (self.measured.loads - self.warmup.loads) / max(self.measured.requests, 1)

    @property
    def loads_per_request_all(self) -> float:
        """Adapter loads per request over both phases (cold start included)."""
        return self.measured.loads / max(self.warmup.requests + self.measured.requests, 1)

    @property
    def busiest_share(self) -> float:
        """Share of the measured phase's answered requests that the busiest replica answered."""
        by_replica = self.measured.requests_by_replica
        return max(by_replica.values()) / max(sum(by_replica.values()), 1)

    @property
    def p50_ttft_ms(self) -> float:
        return statistics.median(self.measured.ttft_ms) if self.measured.ttft_ms else float("nan")

    @property
    def failures(self) -> int:
        return self.warmup.failures + self.measured.failures


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


async def drive(url: str, workload: list[str], args: argparse.Namespace,
                loads_before: dict[str, int] | None = None) -> Phase:
    """Closed loop: `concurrency` clients, each sending its next request when the last one ends.
    ``loads_before``: the replicas' load counters at the end of the previous phase."""
    from lorax_mlflow.ray import ADAPTER_LOADS_HEADER, REPLICA_HEADER

    result = Phase(0.0, 0, [], loads_by_replica=dict(loads_before or {}), requests=len(workload))
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
    base_only = asyncio.run(drive(url, [""] * args.concurrency, _short(args)))  # first-use costs, base only
    assert base_only.failures == 0, f"{name}: base-model warm-up requests failed"
    warmup = asyncio.run(drive(url, workload[:args.warmup], args))
    measured = asyncio.run(drive(url, workload[args.warmup:], args, loads_before=warmup.loads_by_replica))
    logging.getLogger(__name__).warning("%s: warm-up %d requests in %.0f s, measured %d in %.0f s", name,
                                        warmup.requests, warmup.seconds, measured.requests, measured.seconds)
    serve.delete("scale-out")
    return RunResult(name, warmup, measured)


def _short(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "max_tokens": 2})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--warmup", type=int, default=400,
                        help="requests that fill the replicas' adapter caches before the measured ones (not measured)")
    parser.add_argument("--requests", type=int, default=400, help="measured requests, after the warm-up")
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
        workload = zipf_workload([str(a) for a in adapters], args.warmup + args.requests, args.zipf)
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

    distinct = len(set(workload[args.warmup:]))
    print(f"\nScale-out on Ray Serve over loopback: {args.model} model, {args.adapters} rank-{args.rank} adapters "
          f"(Zipf s={args.zipf}), {args.warmup} warm-up + {args.requests} measured requests ({distinct} distinct "
          f"adapters measured), {args.concurrency} streaming clients, {args.max_tokens} tokens each; 1 CPU per "
          f"replica, host cache {args.host_adapters} adapters, {args.slots} slots; affinity leaves an owner over "
          f"{args.overload_slack} requests and {args.overload_ratio}x above the least-loaded replica")
    print(f"machine: {machine_line()}; Serve proxy, ingress and this client share the same cores as the replicas")
    print("tokens/s, p50 TTFT, loads/request and busiest replica: measured phase; loads/request all: warm-up included")
    print(f"{'run':<32} {'tokens/s':>9} {'p50 TTFT ms':>12} {'loads/request':>14} {'loads/request all':>18} "
          f"{'busiest replica':>16} {'failed':>7}")
    for run in runs:
        print(f"{run.name:<32} {run.tokens_per_s:>9.1f} {run.p50_ttft_ms:>12.1f} {run.loads_per_request:>14.3f} "
              f"{run.loads_per_request_all:>18.3f} {run.busiest_share:>15.0%} {run.failures:>7}")
    one, two, spread = runs
    print(f"2 replicas / 1 replica throughput = {two.tokens_per_s / one.tokens_per_s:.2f} (target >= 1.7)")
    print(f"adapter loads per request after warm-up, affinity / load-based = "
          f"{_ratio(two.loads_per_request, spread.loads_per_request):.2f} (target <= 0.6)")
    print(f"adapter loads per request over all {args.warmup + args.requests} requests (cold start included), "
          f"affinity / load-based = {_ratio(two.loads_per_request_all, spread.loads_per_request_all):.2f}")
    print(f"p50 TTFT 2 replicas / 1 replica = {two.p50_ttft_ms / one.p50_ttft_ms:.2f} (target <= 1.0)")
    print(f"p50 TTFT affinity / load-based = {two.p50_ttft_ms / spread.p50_ttft_ms:.2f} (target <= 1.0)")
    print(f"cores: {os.cpu_count()}; 2 replicas x 1 core leave no core for Serve's proxy, the ingress and the "
          "client on a 2-core machine")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


if __name__ == "__main__":
    main()
