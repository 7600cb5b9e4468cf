"""Pick the backend for a call: Triton for CUDA tensors when triton imports, torch otherwise.

Callers never branch on device. The choice can be forced per call (`backend=`) or per process
with the environment variable LORAX_KERNELS_BACKEND=triton|torch|auto (default auto). Forcing
"triton" on CPU tensors is how the kernels are tested under TRITON_INTERPRET=1, which must be
set before the Triton module is first imported; it is imported lazily, on the first Triton call.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

BACKEND_ENV_VAR = "LORAX_KERNELS_BACKEND"
BACKENDS = ("auto", "triton", "torch")


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    """The backend ("triton" or "torch") that a call on `tensor` will use."""
    choice = (backend or os.environ.get(BACKEND_ENV_VAR) or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown LoRA kernel backend {choice!r}; expected one of {BACKENDS}")
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("the triton LoRA kernel backend was requested but triton is not installed")
    return choice


def backend_module(tensor: torch.Tensor, backend: str | None = None) -> ModuleType:
    return _load_backend(resolve_backend(tensor, backend))


@cache
def _load_backend(name: str) -> ModuleType:
    return importlib.import_module(".triton_sgmv" if name == "triton" else ".torch_ops", __package__)
