"""The Triton SGMV kernels against the float64 references, through the public API with
backend="triton".

Runs on CUDA when a GPU is present (all dtypes), else only inside Triton's interpreter on CPU
tensors: tests/test_kernels.py::test_triton_kernels_under_interpreter runs this module in a fresh
process with TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py` does the
same by hand). bf16 runs on the GPU only: the interpreter's bf16 tl.dot is wrong.
"""

from __future__ import annotations

import os

import pytest
import torch

from lorax_kernels import lora_shrink, make_lora_meta
from tests.test_kernels import KERNEL_CASES, check_add_lora, check_shrink_and_expand, make_inputs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip(
        "no GPU: runs under TRITON_INTERPRET=1 via test_kernels.py::test_triton_kernels_under_interpreter",
        allow_module_level=True,
    )

DEVICE = "cpu" if INTERPRETED else "cuda"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRETED, reason="interpreter bf16 tl.dot is wrong")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda case: case.name)
def test_triton_kernels_match_reference(case, dtype):
    check_shrink_and_expand(case, dtype, device=DEVICE, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_add_lora_matches_reference(dtype):
    check_add_lora(KERNEL_CASES[0], dtype, device=DEVICE, backend="triton")


def test_triton_rejects_meta_on_another_device():
    if INTERPRETED:
        pytest.skip("needs operands on a second device")
    case = KERNEL_CASES[0]
    inputs = make_inputs(case, torch.float16, DEVICE)
    meta = make_lora_meta(inputs.token_lora, case.num_slots, device="cpu")
    with pytest.raises(ValueError, match="meta index tensors"):
        lora_shrink(inputs.x, inputs.a_stacks, meta, backend="triton")
