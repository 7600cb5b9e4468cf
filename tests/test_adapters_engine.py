"""Adapters end to end through the engine: every source, private adapters, the tiered cache, merging
and adapter chat templates. Outputs are always compared with PEFT running the same adapter alone."""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import huggingface_hub.constants
import pytest
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.adapters.merge import MergeSpec
from lorax_mlflow.api.chat_request import mlflow_chat_request
from lorax_mlflow.client.engine_client import EngineClient
from lorax_mlflow.errors import AdapterAuthError, AdapterForbiddenError
from lorax_mlflow.service import LoraxService
from tests.engine_support import PROMPTS, adapter, encode, greedy, hf_greedy, load_hf, make_engine
from tests.helpers import build_peft_adapter
from tests.support.hub_cache import add_commit, folder_files
from tests.support.tiny_hub import HubRepo, TinyHub

MAX_TOKENS = 10
RIGHT, UNKNOWN = "hf_right", "hf_bogus"


def peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt: list[int]) -> list[int]:
    """Reference: PEFT with only this adapter (or the bare base model), greedy."""
    return list(_peft_greedy(model_dir, adapter_dir, tuple(prompt)))


@functools.cache
def _peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt: tuple[int, ...]) -> tuple[int, ...]:
    model = load_hf(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return tuple(hf_greedy(model, list(prompt), MAX_TOKENS))


def tokens(stream) -> list[int]:
    return stream.result().outputs[0].token_ids


def assert_nothing_leaked(engine: EngineClient) -> None:
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
    assert all(refs == 0 for refs in engine.core.slots.refs)


@contextmanager
def running_engine(model_dir: Path, **config) -> Iterator[EngineClient]:
    engine = make_engine(model_dir, **config)
    try:
        yield engine
    finally:
        engine.shutdown()


@pytest.fixture
def hub_env(monkeypatch, tmp_path) -> Path:
    """A fresh, empty huggingface_hub cache and no ambient tokens; returns the cache folder."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "LORAX_USE_GLOBAL_HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return cache


@contextmanager
def serving_hub(hub: TinyHub, monkeypatch) -> Iterator[TinyHub]:
    with hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {name: data for name, data in folder_files(folder).items() if name.startswith("adapter_")}


# --- sources --------------------------------------------------------------------------------------


def test_hub_adapters_from_an_offline_cache_with_revisions_equal_peft(
    hub_env, monkeypatch, tiny_model_dir, tiny_adapters
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_commit(hub_env, "org/adapter", folder_files(tiny_adapters["a"]), refs=["main"])
    v2 = add_commit(hub_env, "org/adapter", folder_files(tiny_adapters["b"]), refs=["v2"])
    cases = [("org/adapter", "a"), ("org/adapter@main", "a"), ("org/adapter@v2", "b"), (f"org/adapter@{v2}", "b")]
    prompt = encode(tiny_model_dir, PROMPTS[0])

    with running_engine(tiny_model_dir, download_dir=str(hub_env.parent / "downloads")) as engine:
        engine.core.adapters.sources.access_record.set("org/adapter", "public")  # as learned online before
        streams = [engine.submit(prompt, greedy(MAX_TOKENS), adapter(adapter_id)) for adapter_id, _ in cases]
        for (adapter_id, name), stream in zip(cases, streams):
            assert tokens(stream) == peft_greedy(tiny_model_dir, tiny_adapters[name], prompt), adapter_id
        assert_nothing_leaked(engine)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_adapter_is_downloaded_and_equals_peft(s3_server, monkeypatch, tmp_path, tiny_model_dir, tiny_adapters):
    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    bucket = f"adapters-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    for name, data in folder_files(tiny_adapters["c"]).items():  # adapter c is saved as adapter_model.bin
        client.put_object(Bucket=bucket, Key=f"team/c/{name}", Body=data)
    prompt = encode(tiny_model_dir, PROMPTS[1])

    with running_engine(tiny_model_dir, download_dir=str(tmp_path), s3_allow=[f"s3://{bucket}/team"]) as engine:
        out = tokens(engine.submit(prompt, greedy(MAX_TOKENS), adapter(f"s3://{bucket}/team/c", adapter_source="s3")))

    assert out == peft_greedy(tiny_model_dir, tiny_adapters["c"], prompt)
    assert (tmp_path / "s3" / bucket / "team" / "c" / "adapter_model.bin").is_file()


# --- private adapters -----------------------------------------------------------------------------


def test_private_adapter_needs_a_valid_token_on_every_request_even_when_cached(
    hub_env, monkeypatch, tiny_model_dir, tiny_adapters
):
    repos = {"org/private": HubRepo(adapter_files(tiny_adapters["a"]), access_tokens=frozenset({RIGHT}))}
    prompt = encode(tiny_model_dir, PROMPTS[2])
    expected = peft_greedy(tiny_model_dir, tiny_adapters["a"], prompt)

    with serving_hub(TinyHub(repos, known_tokens={RIGHT}), monkeypatch), running_engine(tiny_model_dir) as engine:
        assert tokens(engine.submit(prompt, greedy(MAX_TOKENS), adapter("org/private", api_token=RIGHT))) == expected

        # The weights are now on disk, in host memory and in a device slot; still refused.
        refused = [
            (adapter("org/private"), AdapterAuthError, 401),
            (adapter("org/private", api_token=UNKNOWN), AdapterForbiddenError, 403),
            (AdapterRequest(merged_adapters=MergeSpec(("org/private",))), AdapterAuthError, 401),
        ]
        for request, error, status in refused:
            with pytest.raises(error) as raised:
                engine.submit(prompt, greedy(MAX_TOKENS), request)
            assert type(raised.value) is error and raised.value.status == status

        assert tokens(engine.submit(prompt, greedy(MAX_TOKENS), adapter("org/private", api_token=RIGHT))) == expected
        assert_nothing_leaked(engine)
        stats = engine.adapters.adapter_stats()["org/private"]
        assert (stats.requests, stats.loads) == (2, 1)  # refused requests are not served, not counted


# --- the tiered cache -----------------------------------------------------------------------------


def test_concurrent_requests_for_a_cold_hub_adapter_download_and_load_it_once(
    hub_env, monkeypatch, tiny_model_dir, tiny_adapters
):
    repos = {"org/popular": HubRepo(adapter_files(tiny_adapters["b"]))}
    prompts = [encode(tiny_model_dir, PROMPTS[i % 2]) for i in range(6)]
    start = threading.Barrier(len(prompts))
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        start.wait()
        results[i] = tokens(engine.submit(prompts[i], greedy(MAX_TOKENS), adapter("org/popular")))

    with serving_hub(TinyHub(repos, known_tokens=set()), monkeypatch) as hub, running_engine(tiny_model_dir) as engine:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        weight_downloads = [p for method, p, _ in hub.requests if method == "GET" and p.endswith(".safetensors")]
        stats = engine.adapters.adapter_stats()["org/popular"]
        assert_nothing_leaked(engine)

    assert len(weight_downloads) == 1
    assert (stats.requests, stats.loads, stats.slot_placements) == (len(prompts), 1, 1)
    for i, prompt in enumerate(prompts):
        assert results[i] == peft_greedy(tiny_model_dir, tiny_adapters["b"], prompt)


class HeldHub(TinyHub):
    """A hub whose file downloads hang until `release` is set: an adapter source that is slow."""

    def __init__(self, repos: dict[str, HubRepo]) -> None:
        self.download_started = threading.Event()
        self.release = threading.Event()
        super().__init__(repos, known_tokens=set())

    def _handler_class(self):
        hub = self

        class HeldHandler(super()._handler_class()):
            def _serve(self, send_body: bool) -> None:
                if "/resolve/" in self.path:
                    hub.download_started.set()
                    hub.release.wait(timeout=60)
                super()._serve(send_body)

        return HeldHandler


def test_requests_keep_decoding_while_another_adapter_is_loading(hub_env, monkeypatch, tiny_model_dir, tiny_adapters):
    hub = HeldHub({"org/slow": HubRepo(adapter_files(tiny_adapters["c"]))})
    prompt = encode(tiny_model_dir, PROMPTS[3])
    slow: dict[str, list[int]] = {}

    def slow_client() -> None:
        slow["tokens"] = tokens(engine.submit(prompt, greedy(MAX_TOKENS), adapter("org/slow")))

    with serving_hub(hub, monkeypatch), running_engine(tiny_model_dir) as engine:
        thread = threading.Thread(target=slow_client)
        thread.start()
        try:
            assert hub.download_started.wait(timeout=30)
            base_streams = [engine.submit(encode(tiny_model_dir, p), greedy(MAX_TOKENS)) for p in PROMPTS[:2]]
            base = [tokens(s) for s in base_streams]  # finish while the adapter is still downloading
            assert "tokens" not in slow and thread.is_alive()
        finally:
            hub.release.set()
            thread.join()
        assert_nothing_leaked(engine)

    assert slow["tokens"] == peft_greedy(tiny_model_dir, tiny_adapters["c"], prompt)
    for text, out in zip(PROMPTS, base):
        assert out == peft_greedy(tiny_model_dir, None, encode(tiny_model_dir, text))


def test_more_adapters_in_flight_than_device_slots_evicts_and_stays_correct(
    tiny_model_dir, adapter_root, tiny_adapters
):
    names = ["a", "b", "c", None, "c", "a", "b"]
    prompts = [encode(tiny_model_dir, PROMPTS[i % 2]) for i in range(len(names))]

    with running_engine(tiny_model_dir, adapter_roots=[adapter_root], max_loras=2) as engine:
        streams = [
            engine.submit(prompt, greedy(MAX_TOKENS), adapter(str(tiny_adapters[n])) if n else None)
            for n, prompt in zip(names, prompts)
        ]
        results = [tokens(s) for s in streams]
        stats = engine.adapters.adapter_stats()
        assert_nothing_leaked(engine)

    for name, prompt, out in zip(names, prompts, results):
        assert out == peft_greedy(tiny_model_dir, tiny_adapters[name] if name else None, prompt), name
    assert sum(s.slot_evictions for s in stats.values()) >= 1
    assert all(s.loads == 1 for s in stats.values())  # evicted from a slot, not from host memory


@pytest.fixture(scope="module")
def partial_adapter(tiny_model_dir, adapter_root) -> Path:
    """Rank 16 on q_proj and v_proj only: replacing an all-module adapter must clear the others."""
    return build_peft_adapter(tiny_model_dir, adapter_root / "partial", rank=16, alpha=16, seed=14,
                              targets=["q_proj", "v_proj"])


def test_host_memory_lru_evicts_and_reloads_from_disk(tiny_model_dir, adapter_root, tiny_adapters, partial_adapter):
    folders = {**tiny_adapters, "partial": partial_adapter}
    order = ["a", "b", "a", "c", "partial", "a"]  # ranks 4, 8, 4, 16, 16 on 2 of 7 modules, 4
    prompt = encode(tiny_model_dir, PROMPTS[4])
    # One device slot and a host budget below two adapters: every switch evicts from both tiers.
    with running_engine(tiny_model_dir, adapter_roots=[adapter_root], max_loras=1, host_cache_bytes=1) as engine:
        results = [tokens(engine.submit(prompt, greedy(MAX_TOKENS), adapter(str(folders[n])))) for n in order]
        stats = engine.adapters.adapter_stats()[str(tiny_adapters["a"])]
        assert_nothing_leaked(engine)

    for name, out in zip(order, results):
        assert out == peft_greedy(tiny_model_dir, folders[name], prompt), name
    assert (stats.requests, stats.loads, stats.cache_hits) == (3, 3, 0)
    assert stats.host_evictions == 2 and stats.slot_evictions == 2


# --- merging --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def same_rank_adapters(tiny_model_dir, adapter_root) -> tuple[Path, Path]:
    """Two rank-8 adapters with different alphas (so different scalings), mergeable with each other."""
    return (
        build_peft_adapter(tiny_model_dir, adapter_root / "merge-d", rank=8, alpha=16, seed=21),
        build_peft_adapter(tiny_model_dir, adapter_root / "merge-e", rank=8, alpha=4, seed=22),
    )


def linear_merge_as_peft_folder(adapters: tuple[Path, ...], weights: tuple[float, ...], folder: Path) -> Path:
    """The expected linear merge, written as a PEFT adapter: lora_A = sum w*A, lora_B = sum w*scale*B, alpha = r."""
    configs = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    tensors = [load_file(a / "adapter_model.safetensors") for a in adapters]
    merged = {}
    for key in tensors[0]:
        is_b = ".lora_B." in key
        merged[key] = sum(
            w * t[key] * (c["lora_alpha"] / c["r"] if is_b else 1.0) for w, t, c in zip(weights, tensors, configs)
        ).contiguous()
    folder.mkdir()
    save_file(merged, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({**configs[0], "lora_alpha": configs[0]["r"]}))
    return folder


def test_linear_merge_equals_peft_with_the_merged_adapter_and_is_cached_by_recipe(
    tiny_model_dir, adapter_root, same_rank_adapters, tmp_path
):
    weights = (0.7, 0.5)
    spec = MergeSpec(tuple(str(p) for p in same_rank_adapters), weights)
    expected_folder = linear_merge_as_peft_folder(same_rank_adapters, weights, tmp_path / "merged")
    prompts = [encode(tiny_model_dir, p) for p in PROMPTS[:2]]

    with running_engine(tiny_model_dir, adapter_roots=[adapter_root]) as engine:
        first = tokens(engine.submit(prompts[0], greedy(MAX_TOKENS), AdapterRequest(merged_adapters=spec)))
        second = tokens(engine.submit(prompts[1], greedy(MAX_TOKENS), AdapterRequest(merged_adapters=spec)))
        stats = engine.adapters.adapter_stats()[f"merge:{spec.recipe_key()}"]
        assert_nothing_leaked(engine)

    assert first == peft_greedy(tiny_model_dir, expected_folder, prompts[0])
    assert second == peft_greedy(tiny_model_dir, expected_folder, prompts[1])
    assert (stats.requests, stats.loads, stats.cache_hits) == (2, 1, 1)


# --- adapter chat templates -----------------------------------------------------------------------

ADAPTER_TEMPLATE = "{% for m in messages %}[[adapter-template {{ m['role'] }}]] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def adapter_with_template(tiny_model_dir, tiny_adapters, adapter_root) -> Path:
    folder = adapter_root / "with-template"
    shutil.copytree(tiny_adapters["a"], folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ADAPTER_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_adapter_chat_template_wins_over_the_base_one(tiny_model_dir, adapter_root, tiny_adapters, adapter_with_template):
    messages = [{"role": "user", "content": "Hi there"}]
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base_prompt = base_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    with running_engine(tiny_model_dir, adapter_roots=[adapter_root]) as engine:
        service = LoraxService(engine)
        body = {"messages": messages, "temperature": 0.0, "max_tokens": MAX_TOKENS}
        own = mlflow_chat_request(service, {**body, "adapter_id": str(adapter_with_template)})
        plain = mlflow_chat_request(service, {**body, "adapter_id": str(tiny_adapters["a"])})
        base = mlflow_chat_request(service, body)
        out = tokens(service.submit(own))

    assert base_tokenizer.decode(own.prompt_token_ids) == "[[adapter-template user]] Hi there\n"
    assert base_tokenizer.decode(plain.prompt_token_ids) == base_prompt
    assert base_tokenizer.decode(base.prompt_token_ids) == base_prompt
    assert out == peft_greedy(tiny_model_dir, adapter_with_template, own.prompt_token_ids)
