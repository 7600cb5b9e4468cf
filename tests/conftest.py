"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer, and real PEFT adapters for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine_support import load_hf, make_engine
from tests.helpers import build_peft_adapter, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The configured adapter root that the tiny adapters live under."""
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, adapter_root: Path) -> dict[str, Path]:
    """Three PEFT adapters of different ranks (one rsLoRA, one saved as .bin), all 7 target modules."""
    return {
        "a": build_peft_adapter(tiny_model_dir, adapter_root / "a", rank=4, alpha=8, seed=11),
        "b": build_peft_adapter(tiny_model_dir, adapter_root / "b", rank=8, alpha=32, seed=12, use_rslora=True),
        "c": build_peft_adapter(tiny_model_dir, adapter_root / "c", rank=16, alpha=16, seed=13, safetensors=False),
    }


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """An engine over the tiny model with default test settings (modules may override it)."""
    engine = make_engine(tiny_model_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """The same tiny model in plain transformers: the reference for generation."""
    return load_hf(tiny_model_dir)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_model_dir, tiny_adapters, adapter_root):
    """The tiny model saved as an MLflow model with adapters "a" and "b" (see server_support)."""
    from tests.server_support import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("served"), tiny_model_dir, tiny_adapters, adapter_root)


@pytest.fixture(scope="module")
def served(model_path):
    """That model loaded in-process, as `lorax-mlflow serve` loads it."""
    from tests.server_support import load_tiny_model

    model = load_tiny_model(model_path)
    yield model
    model.service.engine.shutdown()


@pytest.fixture(scope="module")
def server(served):
    """The HTTP server over it, on a free loopback port."""
    from tests.server_support import running_server

    with running_server(served) as running:
        yield running


_open_recorders: list[list[str]] = []


def _record_opens(event: str, args: tuple) -> None:
    if _open_recorders and event in ("open", "os.open") and args and isinstance(args[0], (str, bytes, Path)):
        for recorder in _open_recorders:
            recorder.append(str(args[0]))


@pytest.fixture
def audit_opens():
    """`with audit_opens() as opened:` records every path this process opens meanwhile (audit hooks)."""
    import contextlib
    import sys

    if not getattr(sys, "_lorax_open_hook", False):
        sys.addaudithook(_record_opens)  # audit hooks cannot be removed: installed once, idle when unused
        sys._lorax_open_hook = True

    @contextlib.contextmanager
    def recording():
        opened: list[str] = []
        _open_recorders.append(opened)
        try:
            yield opened
        finally:
            _open_recorders.remove(opened)

    return recording
