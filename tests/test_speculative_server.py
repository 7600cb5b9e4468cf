"""Speculative decoding as a user of `lorax-mlflow serve` sees it: a request names a Medusa adapter (or gets
prompt lookup), LoRAX `details` report the drafts' acceptance, /metrics counts drafts per adapter, and Medusa
heads for another base model are a 400 in LoRAX's error shape."""

from __future__ import annotations

import httpx
import lorax
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorax_mlflow
from lorax_mlflow.server import load_served_model
from tests.helpers import build_medusa_adapter
from tests.mlflow_support import TINY_ENGINE
from tests.server_support import running_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROMPT = "Instruct: say something about the sea\nOutput:"


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory, tiny_model_dir, tiny_adapters, adapter_root):
    heads = build_medusa_adapter(tiny_model_dir, adapter_root / "served-heads", num_heads=3)
    weights = heads / "medusa_lm_head.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights)  # identity heads
    build_medusa_adapter(tiny_model_dir, adapter_root / "heads-for-another-base", hidden_size=32)
    path = tmp_path_factory.mktemp("spec-served") / "model"
    lorax_mlflow.save_model(
        path, base_model=str(tiny_model_dir), adapters={"a": tiny_adapters["a"], "heads": heads},
        adapter_roots=[adapter_root],
        engine_config={**TINY_ENGINE, "speculative_tokens": 3, "speculative_max_batch_size": 64},
    )
    served = load_served_model(str(path))
    with running_server(served) as running:
        yield running
    served.service.engine.shutdown()


def generate(server, parameters: dict) -> httpx.Response:
    return httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": parameters})


@pytest.mark.parametrize("adapter_id", ["heads", "a", ""])
def test_details_report_the_acceptance_of_each_requests_drafts(spec_server, adapter_id):
    body = generate(spec_server, {"adapter_id": adapter_id, "max_new_tokens": 16, "ignore_eos_token": True,
                                  "details": True}).json()
    details = body["details"]
    assert details["generated_tokens"] == 16
    assert 0 < details["accepted_draft_tokens"] <= details["draft_tokens"]
    assert details["acceptance_rate"] == details["accepted_draft_tokens"] / details["draft_tokens"]


def test_lorax_client_reads_speculative_responses(spec_server):
    response = lorax.Client(spec_server.url).generate(PROMPT, adapter_id="heads", max_new_tokens=8,
                                                      ignore_eos_token=True)
    assert response.details.generated_tokens == 8


def test_metrics_count_draft_tokens_per_adapter(spec_server):
    generate(spec_server, {"adapter_id": "heads", "max_new_tokens": 8, "ignore_eos_token": True})
    metrics = httpx.get(spec_server.url + "/metrics").text
    for name in ("lorax_speculative_draft_tokens_total", "lorax_speculative_accepted_tokens_total"):
        assert f'{name}{{adapter="heads"}}' in metrics, metrics


def test_medusa_heads_for_another_base_model_are_a_400(spec_server, adapter_root):
    response = generate(spec_server, {"adapter_id": str(adapter_root / "heads-for-another-base"), "max_new_tokens": 4})
    assert response.status_code == 400
    assert "different base model" in response.json()["error"]
