"""The benchmark scripts run end to end at a tiny scale and print every labelled number they promise.

No timing is asserted: the numbers depend on the machine; only that each row and ratio is there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
