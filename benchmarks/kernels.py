"""Multi-adapter LoRA shrink+expand: lorax_kernels against a bytes-moved floor and two baselines.

For each projection shape, token count T and number of adapters in the batch, times one
`add_lora` (shrink + expand, in place into y) on Llama-3-8B shapes at rank 16 ("split": the same
as separate `lora_shrink` + `lora_expand` calls, the multi-slice API), and compares it with
  floor     bytes the op must move (x, active A and B slots, y read+write) / measured copy bandwidth
  loop      a fair per-adapter loop (PEFT's mixed batch without its per-call nonzero): token
            indices grouped once beforehand; per adapter, gather its tokens, x @ A^T @ B^T, add back
  gather    gather every token's A and B, then two bmm's
On the Triton backend it also times the shrink's batch-adaptive split-K with float32 atomics
("splitK"), against which the default deterministic, batch-invariant split is judged
("det/splitK": the cost of determinism; it stays the default while that is below 1.10).
Tokens are spread evenly over the adapters in shuffled order (requests need not be contiguous).
Every method's result is checked against the kernel's before timing. The header names the device
(GPU model) and dtype that ran; the default dtype is the engine's on that device.

    python benchmarks/kernels.py                 # CUDA if available (bf16), else CPU (fp32)
    python benchmarks/kernels.py --device cpu --small   # hidden sizes / 4: ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import device_label, machine_line
from lorax_kernels import add_lora, is_deterministic, lora_expand, lora_shrink, make_lora_meta, resolve_backend, set_deterministic

LLAMA3_8B_SHAPES = [(4096, 4096), (4096, 14336)]  # q/o projections, gate/up projections
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def elapsed_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Wall time of one call in milliseconds (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def median_ms(methods: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median time of each method; the methods take turns, so a busy machine slows them alike."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            samples[name].append(elapsed_ms(fn, device))
    return {name: statistics.median(times) for name, times in samples.items()}


def copy_bandwidth_bytes_per_ms(device: torch.device, repeats: int) -> float:
    """Read+write bandwidth of a large tensor copy, the memory floor any kernel has to respect."""
    numel = 64 * 2**20  # 256 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_ms({"copy": lambda: dst.copy_(src)}, device, repeats, warmup=2)["copy"]
    return 2 * src.numel() * src.element_size() / ms


def per_adapter_loop(y, x, a_stack, b_stack, groups) -> None:
    """groups: (adapter, its token indices on the device), computed once outside the timed call."""
    for adapter, tokens in groups:
        y.index_add_(0, tokens, (x[tokens] @ a_stack[adapter].T) @ b_stack[adapter].T)


def gather_bmm(y, x, a_stack, b_stack, token_lora) -> None:
    v = torch.bmm(a_stack[token_lora], x[:, :, None])  # [T, r, 1]
    y += torch.bmm(b_stack[token_lora], v)[:, :, 0]


def bench_one(in_f, out_f, num_tokens, num_adapters, rank, dtype, device, bandwidth, repeats, compare_split_k) -> dict:
    generator = torch.Generator().manual_seed(num_tokens * 131 + num_adapters)
    a_stack = (torch.randn(num_adapters, rank, in_f, generator=generator) * in_f**-0.5).to(device, dtype)
    b_stack = (torch.randn(num_adapters, out_f, rank, generator=generator) * rank**-0.5).to(device, dtype)
    x = torch.randn(num_tokens, in_f, generator=generator).to(device, dtype)
    y = torch.zeros(num_tokens, out_f, device=device, dtype=dtype)
    slots = (torch.arange(num_tokens) % num_adapters)[torch.randperm(num_tokens, generator=generator)]
    token_lora = slots.to(device)
    groups = [(adapter, torch.nonzero(slots == adapter).flatten().to(device)) for adapter in sorted(set(slots.tolist()))]
    meta = make_lora_meta(slots.tolist(), num_adapters, device=device)

    def ours() -> None:
        add_lora(y, x, a_stack, b_stack, meta)

    def ours_split() -> None:
        lora_expand(lora_shrink(x, [a_stack], meta), [b_stack], meta, y)

    def ours_split_k_atomics() -> None:
        set_deterministic(False)
        try:
            add_lora(y, x, a_stack, b_stack, meta)
        finally:
            set_deterministic(True)

    def loop() -> None:
        per_adapter_loop(y, x, a_stack, b_stack, groups)

    def gather() -> None:
        gather_bmm(y, x, a_stack, b_stack, token_lora)

    methods = {"ours": ours, "split": ours_split, "loop": loop, "gather": gather}
    if compare_split_k:
        methods["splitK"] = ours_split_k_atomics
    check_same_result(list(methods.values()), y)
    element = x.element_size()
    bytes_moved = element * (
        num_tokens * in_f + len(groups) * rank * (in_f + out_f) + 2 * num_tokens * out_f
    ) + 4 * 2 * num_tokens * rank  # float32 v written and read back
    return {**median_ms(methods, device, repeats, warmup=2), "floor": bytes_moved / bandwidth}


def check_same_result(methods: list[Callable[[], None]], y: torch.Tensor) -> None:
    results = []
    for method in methods:
        y.zero_()
        method()
        results.append(y.float().clone())
    scale = results[0].abs().max().item()
    for result in results[1:]:
        error = (result - results[0]).abs().max().item()
        if error > 2e-2 * max(scale, 1.0):
            raise AssertionError(f"baseline disagrees with the kernel: max error {error:.3g} (scale {scale:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: the engine's on that device (bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--small", action="store_true", help="hidden sizes / 4 (for CPU runs)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 9 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    repeats = args.repeats or (50 if device.type == "cuda" else 9)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(i // 4, o // 4) for i, o in LLAMA3_8B_SHAPES] if args.small else LLAMA3_8B_SHAPES
    bandwidth = copy_bandwidth_bytes_per_ms(device, repeats)
    backend = resolve_backend(torch.empty(0, device=device))
    compare_split_k = backend == "triton"
    print(f"{device_label(device, dtype)}; {machine_line()}; rank={args.rank} backend={backend} "
          f"shrink split-K={'deterministic' if is_deterministic() else 'batch-adaptive atomics'} "
          f"threads={torch.get_num_threads()} copy bandwidth={bandwidth / 1e6:.1f} GB/s")
    columns = [("in->out", 11), ("T", 5), ("adapters", 8), ("ours ms", 8), ("floor ms", 8), ("ours/floor", 10),
               ("split ms", 8), ("splitK ms", 9), ("det/splitK", 10), ("loop ms", 8), ("loop/ours", 9),
               ("gather+bmm ms", 13), ("gather/ours", 11)]
    print("| " + " | ".join(f"{name:>{width}}" for name, width in columns) + " |")
    print("|" + "|".join("-" * (width + 2) for _, width in columns) + "|")
    for in_f, out_f in shapes:
        for num_tokens in args.tokens:
            for num_adapters in args.adapters:
                t = bench_one(in_f, out_f, num_tokens, num_adapters, args.rank, dtype, device, bandwidth, repeats,
                              compare_split_k)
                split_k = (f"{t['splitK']:.3f}", f"{t['ours'] / t['splitK']:.2f}") if compare_split_k else ("-", "-")
                cells = [f"{in_f}->{out_f}", num_tokens, num_adapters, f"{t['ours']:.3f}", f"{t['floor']:.3f}",
                         f"{t['ours'] / t['floor']:.2f}", f"{t['split']:.3f}", *split_k, f"{t['loop']:.3f}",
                         f"{t['loop'] / t['ours']:.2f}", f"{t['gather']:.3f}", f"{t['gather'] / t['ours']:.2f}"]
                print("| " + " | ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns)) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
