"""The benchmark scripts run end to end at a tiny scale and print every labelled number they promise.

No timing is asserted: the numbers depend on the machine; only that each row and ratio is there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+(?:\.\d+)?"

TINY_LLAMA_FLAGS = [
    "--device", "cpu", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
    "--kv-heads", "2", "--vocab", "512", "--requests", "4", "--prompt-tokens", "8", "--max-tokens", "6",
    "--adapters", "2",
]


def run_module(module: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_throughput_prints_each_run_its_roofline_and_the_target_ratios():
    out = run_module("benchmarks.gpu_throughput", *TINY_LLAMA_FLAGS)

    assert re.search(rf"^copy bandwidth: {NUMBER} GB/s$", out, re.M), out
    for run in ("engine, base only", "engine, 2 adapters"):
        # tokens/s, decode step ms, roofline ms, step/roofline
        assert re.search(rf"^{re.escape(run)} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$", out, re.M), out
    assert re.search(rf"^PEFT mixed-batch generate +{NUMBER} +- +- +-$", out, re.M), out
    for ratio in (
        r"engine 2 adapters / engine base-only = {n} \(target >= 0\.9\)",
        r"engine 2 adapters / PEFT mixed-batch = {n} \(target >= 10\)",
        r"decode step / roofline, engine, base only = {n} \(target <= 2\)",
        r"decode step / roofline, engine, 2 adapters = {n} \(target <= 2\)",
    ):
        assert re.search("^" + ratio.format(n=NUMBER) + "$", out, re.M), out


def test_kernel_benchmark_labels_the_device_and_dtype_it_ran_and_prints_every_column():
    out = run_module("benchmarks.kernels", "--device", "cpu", "--small", "--tokens", "4", "--adapters", "2",
                     "--repeats", "1")

    assert re.search(r"^float32 on cpu; .*; rank=16 backend=torch shrink split-K=deterministic ", out, re.M), out
    columns = ["in->out", "T", "adapters", "ours ms", "floor ms", "ours/floor", "split ms", "splitK ms", "det/splitK",
               "loop ms", "loop/ours", "gather+bmm ms", "gather/ours"]
    assert re.search(r"^\| +" + r" \| +".join(re.escape(c) for c in columns) + r" \|$", out, re.M), out
    for shape in ("1024->1024", "1024->3584"):  # --small: Llama-3-8B hidden sizes / 4
        # splitK (the batch-adaptive Triton shrink) is timed only on the Triton backend
        cells = [shape, "4", "2", *[NUMBER] * 4, "-", "-", *[NUMBER] * 4]
        assert re.search(r"^\| +" + r" \| +".join(cells) + r" \|$", out, re.M), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_check_stops_at_once_and_says_why_without_cuda(tmp_path):
    log = tmp_path / "gpu_check.log"
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GPU_CHECK_LOG": str(log)})

    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu_check: FAILED: no CUDA device visible to torch" in done.stdout
    assert "===" not in done.stdout.replace("=== gpu_check summary", ""), "no stage may start without CUDA"
    assert "cuda: none, nothing run" in done.stdout
    assert f"gpu_check: log written to {log}" in done.stdout
    assert "no CUDA device visible" in log.read_text()


def test_prefix_cache_benchmark_prints_both_modes_the_target_ratios_and_the_shared_prefill():
    out = run_module("benchmarks.prefix_cache", "--quick")

    for mode in ("without cache", "with cache"):  # turn-2 TTFT ms, wall s, tok/s, prompt tokens, cached
        assert re.search(rf"^{mode} +{NUMBER} +{NUMBER} +{NUMBER} +\d+ +\d+$", out, re.M), out
    assert re.search(rf"^turn-2 TTFT without / with cache = {NUMBER}x \(target >= 8\)$", out, re.M), out
    assert re.search(rf"^throughput with / without cache = {NUMBER}x \(target >= 1\.5\)$", out, re.M), out
    for mode in ("without cache", "with cache"):
        assert re.search(rf"^{mode} +prefilled \d+ prompt tokens = .* system prompt prefilled {NUMBER} times$",
                         out, re.M), out
