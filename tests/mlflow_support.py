"""Shared pieces of the MLflow-facing tests: the small engine settings and a throwaway tracking store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

# device "cpu": the tests compare with CPU float32 references, also on a machine with a GPU.
TINY_ENGINE = {"kv_cache_bytes": 8 << 20, "max_model_len": 256, "max_loras": 4, "max_lora_rank": 16, "device": "cpu"}
"""Engine config for models built on the tiny test Llama: a small KV cache, 4 slots of rank <= 16."""


@contextmanager
def throwaway_experiment(root: Path, name: str) -> Iterator[str]:
    """A sqlite tracking store (artifacts beside it) for the duration of the block; yields the experiment id."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        yield mlflow.create_experiment(name, artifact_location=(root / "artifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(previous)
