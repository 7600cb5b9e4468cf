"""Medusa adapters in LoRAX's format: every layout LoRAX reads, LoRA+Medusa folders, validation against the
base model, and loading from every adapter source into the tiered cache."""

from __future__ import annotations

import json
import os

import boto3
import mlflow
import pytest
import torch

import lorax_mlflow
from lorax_mlflow.adapters.adapter_folder import BaseModelShape, load_adapter_folder
from lorax_mlflow.adapters.peft_format import load_peft_adapter
from lorax_mlflow.errors import AdapterValidationError
from tests.engine_support import PROMPTS, adapter, encode, greedy, make_engine
from tests.helpers import ALL_TARGETS, build_medusa_adapter, tiny_llama_config
from tests.mlflow_support import throwaway_experiment
from tests.support.hub_cache import folder_files
from tests.support.tiny_hub import HubRepo, TinyHub

HIDDEN, VOCAB = 64, 49152


@pytest.fixture(scope="module")
def base_shape() -> BaseModelShape:
    from transformers import LlamaForCausalLM

    from lorax_mlflow.lora.inject import inject_multi_lora

    model = LlamaForCausalLM(tiny_llama_config())
    layers = inject_multi_lora(model, ALL_TARGETS, 1, 16)
    return BaseModelShape({name: (l.in_features, l.out_features) for name, l in layers.items()}, HIDDEN, VOCAB)


def load(folder, base_shape: BaseModelShape, name: str = "m"):
    return load_adapter_folder(folder, name, base_shape, max_rank=16, target_modules=ALL_TARGETS)


def test_each_lorax_layout_gives_the_same_heads(tmp_path, tiny_model_dir, base_shape):
    own = load(build_medusa_adapter(tiny_model_dir, tmp_path / "own", seed=3), base_shape)
    pickled = load(build_medusa_adapter(tiny_model_dir, tmp_path / "pt", seed=3, layout="pickle"), base_shape)

    assert own.rank == 0 and not own.a and own.medusa is not None
    heads = own.medusa
    assert (heads.num_heads, heads.num_layers, heads.out_w) == (3, 1, None)  # LoRAX v2: shares the lm_head
    assert heads.linear_w.shape == (3, 1, HIDDEN, HIDDEN) and heads.linear_b.shape == (3, 1, HIDDEN)
    assert torch.equal(heads.linear_w, pickled.medusa.linear_w) and torch.equal(heads.linear_b, pickled.medusa.linear_b)
    assert own.nbytes == heads.nbytes > 0


def test_heads_with_their_own_output_projection_and_several_layers(tmp_path, tiny_model_dir, base_shape):
    folder = build_medusa_adapter(tiny_model_dir, tmp_path / "v1", num_heads=2, num_layers=2, out_proj=True)
    heads = load(folder, base_shape).medusa

    assert heads.linear_w.shape == (2, 2, HIDDEN, HIDDEN) and heads.out_w.shape == (2, VOCAB, HIDDEN)


def test_checkpoint_with_more_heads_than_configured_serves_the_configured_ones(tmp_path, tiny_model_dir, base_shape):
    folder = build_medusa_adapter(tiny_model_dir, tmp_path / "extra", num_heads=4)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 2}))

    assert load(folder, base_shape).medusa.num_heads == 2


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_lora_and_medusa_in_one_folder_serve_both(layout, tmp_path, tiny_model_dir, tiny_adapters, base_shape):
    folder = build_medusa_adapter(tiny_model_dir, tmp_path / layout, seed=5, lora_from=tiny_adapters["a"], layout=layout)
    both = load(folder, base_shape)
    lora_only = load_peft_adapter(tiny_adapters["a"], "a", base_shape.modules, max_rank=16, target_modules=ALL_TARGETS)
    medusa_only = load(build_medusa_adapter(tiny_model_dir, tmp_path / "heads", seed=5), base_shape)

    assert both.rank == lora_only.rank and both.a.keys() == lora_only.a.keys()
    assert all(torch.equal(both.a[k], lora_only.a[k]) and torch.equal(both.b[k], lora_only.b[k]) for k in both.a)
    assert torch.equal(both.medusa.linear_w, medusa_only.medusa.linear_w)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=32), r"different base model.*hidden size 64"),
        (dict(out_proj=True, vocab_size=1000), r"different base model.*vocabulary 49152"),
    ],
)
def test_heads_for_another_base_model_are_refused(kwargs, match, tmp_path, tiny_model_dir, base_shape):
    folder = build_medusa_adapter(tiny_model_dir, tmp_path / "other", **kwargs)
    with pytest.raises(AdapterValidationError, match=match):
        load(folder, base_shape)


def _rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda f: _rewrite_config(f, medusa_num_heads=0), r"medusa_num_heads must be an integer in \[1, 16\]"),
        (lambda f: _rewrite_config(f, medusa_num_layers="1"), r"medusa_num_layers must be an integer"),
        (lambda f: _rewrite_config(f, medusa_num_layers=2), r"head 0 has no tensor 0.1.linear.weight"),
        (lambda f: (f / "medusa_lm_head.safetensors").unlink(), r"no Medusa tensors were found"),
        (lambda f: (f / "medusa_lm_head.safetensors").write_bytes(b"garbage"), r"could not read its Medusa weights"),
        (lambda f: (f / "config.json").write_text("{"), r"config.json is not valid JSON"),
        (lambda f: (f / "config.json").write_text("{}"), r"no adapter_config.json \(LoRA\) or config.json"),
    ],
)
def test_broken_medusa_adapters_fail_with_the_cause(break_it, match, tmp_path, tiny_model_dir, base_shape):
    folder = build_medusa_adapter(tiny_model_dir, tmp_path / "broken")
    break_it(folder)
    with pytest.raises(AdapterValidationError, match=match):
        load(folder, base_shape)


def test_pickled_heads_are_read_without_unpickling_code(tmp_path, tiny_model_dir, base_shape):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = build_medusa_adapter(tiny_model_dir, tmp_path / "evil", layout="pickle")
    torch.save({"medusa_head.0.0.linear.weight": Payload()}, folder / "medusa_lm_head.pt")
    with pytest.raises(AdapterValidationError, match="could not read its Medusa weights"):
        load(folder, base_shape)


# --- through the engine, from every source ---------------------------------------------------------


@pytest.fixture
def s3_bucket(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    client.create_bucket(Bucket="medusa")
    yield client
    server.stop()


def test_medusa_adapters_from_every_source_reach_a_device_slot(
    tmp_path, monkeypatch, s3_bucket, tiny_model_dir, tiny_adapters, adapter_root
):
    heads = build_medusa_adapter(tiny_model_dir, adapter_root / "medusa-heads", seed=7)
    both = build_medusa_adapter(tiny_model_dir, adapter_root / "lora-medusa", seed=8, lora_from=tiny_adapters["a"])
    for name, data in folder_files(both).items():
        s3_bucket.put_object(Bucket="medusa", Key=f"team/both/{name}", Body=data)
    other_base = build_medusa_adapter(tiny_model_dir, adapter_root / "other-base", hidden_size=32)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub_files = folder_files(heads) | {"README.md": b"# heads"}
    prompt = encode(tiny_model_dir, PROMPTS[0])

    with TinyHub({"org/heads": HubRepo(hub_files)}, known_tokens=set()) as hub, \
            throwaway_experiment(tmp_path / "mlflow", "medusa") as experiment_id:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        mlflow.set_experiment(experiment_id=experiment_id)
        logged = lorax_mlflow.log_adapter(both, "lora-medusa", base_model=str(tiny_model_dir))
        engine = make_engine(tiny_model_dir, [adapter_root], download_dir=str(tmp_path / "downloads"),
                             s3_allow=["s3://medusa/team"])
        try:
            base = engine.submit(prompt, greedy(8)).result().outputs[0].token_ids
            lora = engine.submit(prompt, greedy(8), adapter(str(tiny_adapters["a"]))).result().outputs[0].token_ids
            requests = {
                "local": adapter(str(heads)),
                "hub": adapter("org/heads"),
                "s3": adapter("s3://medusa/team/both"),
                "mlflow": adapter(logged.run_uri),
            }
            outputs = {where: engine.submit(prompt, greedy(8), request).result().outputs[0].token_ids
                       for where, request in requests.items()}
            with pytest.raises(AdapterValidationError) as refused:
                engine.submit(prompt, greedy(8), adapter(str(other_base))).result()
            placed = [engine.core.slots.medusa[slot] for slot in engine.core.slots.resident.values()]
        finally:
            engine.shutdown()

    assert refused.value.status == 400
    assert base != lora
    # heads only draft tokens: output is the base model's, or the LoRA's for a LoRA+Medusa adapter
    assert outputs == {"local": base, "hub": base, "s3": lora, "mlflow": lora}
    assert sum(heads is not None for heads in placed) == 4
