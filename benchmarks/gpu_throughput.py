"""Multi-adapter throughput of a Llama-3-8B-shaped model with random weights, against its roofline.

A model of the Llama-3-8B shape (random weights, nothing downloaded) is built on the device,
saved to a temporary folder with `--adapters` random r=16 PEFT adapters made from it, then runs
`--requests` concurrent requests x `--max-tokens` new tokens (random prompt ids, ignore_eos):
  engine base-only | engine with one adapter per request, `--adapters` distinct |
  PEFT mixed-batch generate(adapter_names=...) on the same model and adapters.
The decode step time is the median engine forward over steps that decode one token for every
request; its roofline is the bytes such a step must read (every weight but the input embedding,
the KV cache of the batch, and the A and B of each adapter in the batch) over the copy bandwidth
measured in the same run (activations and logits are left out: < 1% at the default shape).
Targets: engine with adapters >= 0.9x base-only and >= 10x PEFT mixed-batch; decode step
within 2x of its roofline.

    python -m benchmarks.gpu_throughput            # Llama-3-8B shape, 64 x 128 tokens, 32 adapters
    python -m benchmarks.gpu_throughput --device cpu --layers 4 --hidden 256 --intermediate 512 \\
        --heads 8 --kv-heads 2 --vocab 8192 --requests 8 --max-tokens 16 --adapters 4   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.utils import logging as transformers_logging

from benchmarks.common import ALL_TARGETS, device_label, machine_line
from benchmarks.kernels import DTYPES, copy_bandwidth_bytes_per_ms
from lorax_kernels import is_deterministic, resolve_backend
from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.default_model import default_model_path
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.engine.model_runner import ModelRunner
from lorax_mlflow.engine.sampling_params import SamplingParams

BLOCK_SIZE = 16


@dataclass
class DecodeStep:
    seconds: float
    context_tokens: int
    """KV positions the step attends over, summed over the batch."""
    adapters: int
    """Distinct adapters in the batch."""
    sequences: int
    """Sequences decoded (one token each)."""


@contextmanager
def timed_decode_steps(runner: ModelRunner, batch: int) -> Iterator[list[DecodeStep]]:
    """While open, time the engine forwards that decode one token for each of `batch` sequences."""
    execute = runner.execute
    steps: list[DecodeStep] = []

    def timed(scheduled, slot_ranks, *args, **kwargs):
        decoding = len(scheduled) == batch and all(item.num_new_tokens == 1 for item in scheduled)
        started = time.perf_counter()
        logits = execute(scheduled, slot_ranks, *args, **kwargs)
        if decoding:
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            steps.append(DecodeStep(
                seconds=time.perf_counter() - started,
                context_tokens=sum(item.seq.num_tokens for item in scheduled),
                adapters=len({item.seq.lora_slot for item in scheduled} - {-1}),
                sequences=len(scheduled),
            ))
        return logits

    runner.execute = timed
    try:
        yield steps
    finally:
        runner.execute = execute


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=args.vocab - 1, pad_token_id=args.vocab - 1,
    )


def build_random_model(config: LlamaConfig, dtype: torch.dtype, device: torch.device, folder: Path):
    """Instantiate the model with random weights directly on `device` and save it (plus a tokenizer) to `folder`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.config.name_or_path = "random-llama"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return model


def add_random_adapters(model, out_dir: Path, count: int, rank: int):
    """Make `count` random PEFT LoRA adapters on `model` (all 7 projections, small non-zero deltas) and
    save each to `out_dir/adapter-<i>`; returns the PeftModel holding them all."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_TARGETS, init_lora_weights=False)
    names = [f"adapter-{i}" for i in range(count)]
    torch.manual_seed(1)
    with torch.device(model.device):
        peft_model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.1)
    peft_model.save_pretrained(out_dir)  # adapters not named "default" go to out_dir/<name>
    return peft_model.eval()


def run_engine(engine: EngineClient, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    streams = [engine.submit(p, params, AdapterRequest(a) if a else None) for p, a in zip(prompts, adapters)]
    tokens = sum(len(s.result().outputs[0].token_ids) for s in streams)
    return tokens / (time.perf_counter() - started)


def run_peft_mixed(peft_model, prompts: list[list[int]], names: list[str], max_tokens: int) -> float:
    ids = torch.tensor(prompts, device=peft_model.device)  # all prompts have the same length: no padding
    started = time.perf_counter()
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                                  max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return (out.shape[1] - ids.shape[1]) * len(prompts) / (time.perf_counter() - started)


def roofline_seconds(step: DecodeStep, runner: ModelRunner, rank: int, bandwidth_bytes_per_s: float) -> float:
    """Bytes one decode step must read: weights (the input embedding only gathers rows), KV, active adapters."""
    model, cfg, itemsize = runner.model, runner.hf_config, runner.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        weights -= embedding.numel() * embedding.element_size()
    per_adapter = sum(rank * (i + o) for i, o in runner.base_modules.values()) * itemsize
    kv = step.context_tokens * kv_bytes_per_token(cfg, itemsize)
    return (weights + kv + step.adapters * per_adapter) / bandwidth_bytes_per_s


def compute_floor_seconds(step: DecodeStep, runner: ModelRunner, rank: int, flops_per_s: float) -> float:
    """Multiply-adds one decode step must do, at the GEMM rate measured in the same run: every weight
    matrix but the input embedding once per sequence, attention over the context, and each sequence's
    adapter. On a CPU without wide matrix units (AVX2 only) a 16-sequence decode step is bound by this,
    not by the bytes it reads."""
    model, cfg = runner.model, runner.hf_config
    embedding = model.get_input_embeddings().weight
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding)
    if embedding is model.get_output_embeddings().weight:
        matrices += embedding.numel()
    per_token_adapter = sum(rank * (i + o) for i, o in runner.base_modules.values()) if step.adapters else 0
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # q.k and p.v per position
    flops = 2 * (step.sequences * (matrices + per_token_adapter) + step.context_tokens * attention)
    return flops / flops_per_s


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype, rows: int, inner: int, outer: int,
                     repeats: int = 20) -> float:
    """FLOP/s of one [rows, inner] x [inner, outer] matmul, the shape of a decode step's largest GEMMs,
    with this process's torch threads: the compute ceiling the step's own matmuls run against."""
    x = torch.randn(rows, inner, device=device, dtype=dtype)
    w = torch.randn(outer, inner, device=device, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * rows * inner * outer / sorted(times)[len(times) // 2]


def kv_bytes_per_token(config: LlamaConfig, itemsize: int) -> int:
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * itemsize


def kv_cache_bytes(config: LlamaConfig, dtype: torch.dtype, requests: int, tokens_per_request: int) -> int:
    """Room for every request's whole sequence, plus one spare block each."""
    blocks = requests * (-(-tokens_per_request // BLOCK_SIZE) + 1)
    return blocks * BLOCK_SIZE * kv_bytes_per_token(config, dtype.itemsize)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--skip-peft", action="store_true", help="leave out the PEFT mixed-batch baseline")
    return parser.parse_args()


def measure_engine(args: argparse.Namespace, config: LlamaConfig, dtype: torch.dtype, model_dir: Path,
                   adapter_dir: Path, prompts: list[list[int]], names: list[str]):
    """Tokens/s and decode steps of the engine base-only and with one adapter per request; and its runner."""
    engine = EngineClient(model_dir, EngineConfig(
        max_num_seqs=args.requests, max_loras=args.adapters, max_lora_rank=args.rank, block_size=BLOCK_SIZE,
        kv_cache_bytes=kv_cache_bytes(config, dtype, args.requests, args.prompt_tokens + args.max_tokens),
        host_cache_bytes=8 << 30, device=args.device, dtype=str(dtype).removeprefix("torch."),
        in_process=True,  # the decode-step timer wraps the core's runner
    ), named_adapters={name: adapter_dir / name for name in set(names)})
    run_engine(engine, prompts, names, 2)  # warm-up: loads every adapter into its slot
    run_engine(engine, prompts, [None] * args.requests, 2)
    results: dict[str, tuple[float, list[DecodeStep]]] = {}
    for label, per_request in [("engine, base only", [None] * args.requests),
                               (f"engine, {args.adapters} adapters", names)]:
        with timed_decode_steps(engine.core.runner, args.requests) as steps:
            tokens_per_s = run_engine(engine, prompts, per_request, args.max_tokens)
        results[label] = (tokens_per_s, steps)
    engine.shutdown()
    return results, engine.core.runner


def print_report(args: argparse.Namespace, dtype: torch.dtype, bandwidth: float, runner: ModelRunner,
                 results: dict[str, tuple[float, list[DecodeStep]]], peft_tps: float | None) -> None:
    device = torch.device(args.device)
    backend = resolve_backend(torch.empty(0, device=device))
    policy = "deterministic" if is_deterministic() else "batch-adaptive atomics"
    print(f"\n{args.requests} requests x {args.max_tokens} new tokens ({args.prompt_tokens}-token prompts), "
          f"{args.adapters} adapters r={args.rank}; random Llama: {args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, heads {args.heads}/{args.kv_heads} kv, vocab {args.vocab}; "
          f"engine and PEFT in {device_label(device, dtype)}; LoRA kernels {backend}"
          + (f", shrink split-K {policy}" if backend == "triton" else "") + f"; {machine_line()}")
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(f"{'run':<30} {'tokens/s':>10} {'decode step ms':>15} {'roofline ms':>12} {'step/roofline':>14}")
    step_ratios = {}
    for label, (tokens_per_s, steps) in results.items():
        if not steps:
            print(f"{label:<30} {tokens_per_s:>10.1f} {'-':>15} {'-':>12} {'-':>14}")
            continue
        median_step = sorted(steps, key=lambda step: step.seconds)[len(steps) // 2]
        floor = roofline_seconds(median_step, runner, args.rank, bandwidth)
        step_ratios[label] = median_step.seconds / floor
        print(f"{label:<30} {tokens_per_s:>10.1f} {median_step.seconds * 1e3:>15.2f} {floor * 1e3:>12.2f} "
              f"{step_ratios[label]:>14.2f}")
    if peft_tps is not None:
        print(f"{'PEFT mixed-batch generate':<30} {peft_tps:>10.1f} {'-':>15} {'-':>12} {'-':>14}")

    mixed = results[f"engine, {args.adapters} adapters"][0]
    print(f"\nengine {args.adapters} adapters / engine base-only = {mixed / results['engine, base only'][0]:.2f} "
          "(target >= 0.9)")
    if peft_tps is not None:
        print(f"engine {args.adapters} adapters / PEFT mixed-batch = {mixed / peft_tps:.2f} (target >= 10)")
    for label, ratio in step_ratios.items():
        print(f"decode step / roofline, {label} = {ratio:.2f} (target <= 2)")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    transformers_logging.disable_progress_bar()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = llama_config(args)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.requests, args.prompt_tokens), generator=generator).tolist()
    names = [f"adapter-{i % args.adapters}" for i in range(args.requests)]
    bandwidth = copy_bandwidth_bytes_per_ms(device, repeats=20 if device.type == "cuda" else 5) * 1e3

    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as work:
        model_dir, adapter_dir = Path(work) / "model", Path(work) / "adapters"
        peft_model = add_random_adapters(build_random_model(config, dtype, device, model_dir), adapter_dir,
                                         args.adapters, args.rank)
        peft_tps = None
        if not args.skip_peft:
            run_peft_mixed(peft_model, prompts, names, 2)  # warm-up, as for the engine
            peft_tps = run_peft_mixed(peft_model, prompts, names, args.max_tokens)
        del peft_model  # one copy of the weights on the device at a time
        free_device_memory()
        results, runner = measure_engine(args, config, dtype, model_dir, adapter_dir, prompts, names)
    print_report(args, dtype, bandwidth, runner, results, peft_tps)


if __name__ == "__main__":
    main()
