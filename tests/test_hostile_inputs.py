"""Hostile input against the real server: every reproducer of the hardening issue answers a 4xx
naming the parameter, nothing outside the adapter roots is opened, and 16 streams running
meanwhile finish normally with exactly the tokens they produce without the hostile request.

The server runs offline (``HF_HUB_OFFLINE=1``, an empty hub cache) over the tiny model, with
packaged adapters "a" and "b" and an adapter root holding good and bad adapters.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

import lorax_mlflow
from tests.mlflow_support import TINY_ENGINE
from tests.server_support import load_tiny_model, running_server

VOCAB = 49152
STREAMS = 16
STREAM_TOKENS = 12


# --- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, tiny_adapters) -> Path:
    """An adapter root with a good adapter and the issue's bad ones; `outside/` is next to it."""
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "roots", base / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copytree(tiny_adapters["c"], root / "bar1")

    escaped = Path(shutil.copytree(tiny_adapters["a"], root / "escaped-weights"))
    (escaped / "adapter_model.safetensors").rename(outside / "adapter_model.safetensors")
    (escaped / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")

    passwd = Path(shutil.copytree(tiny_adapters["a"], root / "passwd-config"))
    (passwd / "adapter_config.json").unlink()
    (passwd / "adapter_config.json").symlink_to("/etc/passwd")

    nan = Path(shutil.copytree(tiny_adapters["a"], root / "nan-weights"))
    tensors = load_file(nan / "adapter_model.safetensors")
    first_b = sorted(key for key in tensors if "lora_B" in key)[0]
    tensors[first_b][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")

    backtracking = Path(shutil.copytree(tiny_adapters["a"], root / "backtracking-pattern"))
    config = json.loads((backtracking / "adapter_config.json").read_text())
    config["rank_pattern"] = {"(.+)+Q": 16}
    (backtracking / "adapter_config.json").write_text(json.dumps(config))

    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir, tiny_adapters, hostile_root):
    """(server, served model) offline, with the hostile adapter root."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub-cache")))
        path = tmp_path_factory.mktemp("hostile-model") / "model"
        lorax_mlflow.save_model(
            path, base_model=str(tiny_model_dir), adapters={"a": tiny_adapters["a"], "b": tiny_adapters["b"]},
            adapter_roots=[hostile_root],
            engine_config={**TINY_ENGINE, "download_dir": str(tmp_path_factory.mktemp("downloads")),
                           "max_num_seqs": 32},
        )
        served = load_tiny_model(path)
        with running_server(served) as server:
            yield server, served
        served.service.engine.shutdown()


@pytest.fixture(scope="module")
def server(hostile):
    return hostile[0]


@pytest.fixture(scope="module")
def engine(hostile):
    return hostile[1].service.engine


# --- 16 streams running meanwhile ------------------------------------------------------------------

STREAM_MODELS = ["a", "b", ""]


def stream_body(index: int) -> dict:
    return {"model": STREAM_MODELS[index % len(STREAM_MODELS)], "prompt": [1, 100 + index, 200 + index, 300],
            "max_tokens": STREAM_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}


def read_stream(url: str, body: dict) -> tuple[list[str], str | None]:
    texts, finish = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            for choice in event["choices"]:
                texts.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return texts, finish


class Streams:
    """STREAMS completions streams on background threads."""

    def __init__(self, url: str) -> None:
        self.results: dict[int, tuple[list[str], str | None] | BaseException] = {}
        self.threads = [threading.Thread(target=self._run, args=(url, i), daemon=True) for i in range(STREAMS)]

    def _run(self, url: str, index: int) -> None:
        try:
            self.results[index] = read_stream(url, stream_body(index))
        except BaseException as error:  # reported by outputs()
            self.results[index] = error

    def __enter__(self) -> "Streams":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for thread in self.threads:
            thread.join(timeout=120)

    def outputs(self) -> list[str]:
        texts = []
        for index in range(STREAMS):
            result = self.results[index]
            if isinstance(result, BaseException):
                raise result
            pieces, finish = result
            assert finish == "length", (index, finish)
            texts.append("".join(pieces))
        return texts


@pytest.fixture(scope="module")
def reference_outputs(server) -> list[str]:
    """What the 16 streams produce with nothing hostile around."""
    with Streams(server.url) as streams:
        pass
    return streams.outputs()


def wait_until_streaming(engine, minimum: int = 4, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().num_running < minimum and time.monotonic() < deadline:
        time.sleep(0.005)


def assert_4xx(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    error = body.get("error", body)
    if param is not None and isinstance(error, dict) and "param" in error:
        assert error["param"] == param, error
    return body


# --- hostile requests, each fired while 16 streams run ----------------------------------------------

NESTED_SCHEMA: dict = {"type": "string"}
for _ in range(200):
    NESTED_SCHEMA = {"type": "object", "properties": {"x": NESTED_SCHEMA}}

HOSTILE = {
    # one request's bad token id used to fail the whole batch ("internal error during generation")
    "token id >= vocab": ("/v1/completions", {"model": "a", "prompt": [VOCAB], "max_tokens": 4}, 400, "prompt"),
    "token id < 0": ("/v1/completions", {"model": "a", "prompt": [-1], "max_tokens": 4}, 400, "prompt"),
    "token id > 2^63": ("/v1/completions", {"model": "", "prompt": [2**63 + 5], "max_tokens": 4}, 400, "prompt"),
    "1000 prompts": ("/v1/completions", {"model": "", "prompt": ["hi"] * 1000, "max_tokens": 1}, 400, "prompt"),
    "n x prompts": ("/v1/completions", {"model": "", "prompt": ["hi"] * 100, "n": 16, "max_tokens": 1}, 400, "n"),
    "request chat_template without the operator's consent": (
        "/v1/chat/completions",
        {"model": "", "messages": [{"role": "user", "content": "hi"}],
         "chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"},
        400, "chat_template"),
    "lone surrogate in content": (
        "/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2},
        400, "messages[0].content"),
    "lone surrogate in a prompt": ("/v1/completions", {"model": "", "prompt": "a\udfffb", "max_tokens": 2}, 400, "prompt"),
    "seed 10^400": ("/v1/completions", {"model": "", "prompt": "hi", "max_tokens": 2, "seed": 10**400}, 400, "seed"),
    "json_schema nested 200 deep": (
        "/v1/chat/completions",
        {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
         "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": NESTED_SCHEMA}}},
        400, "response_format"),
    "~nosuchuser path": ("/v1/completions", {"model": "~nosuchuser/x", "prompt": "hi", "max_tokens": 2}, 400, "adapter_id"),
    "NUL byte in a path": ("/v1/completions", {"model": "/tmp/a\u0000b", "prompt": "hi", "max_tokens": 2}, 400,
                           "adapter_id"),
    "name over 255 bytes": ("/v1/completions", {"model": "/" + "x" * 300, "prompt": "hi", "max_tokens": 2}, 400,
                            "adapter_id"),
    "unknown adapter, offline": ("/v1/completions", {"model": "bar0", "prompt": "hi", "max_tokens": 2}, 404, "model"),
    "NaN adapter weights": ("/v1/completions", {"model": "{root}/nan-weights", "prompt": "hi", "max_tokens": 2}, 400,
                            None),
    "weights symlinked outside the root": (
        "/v1/completions", {"model": "{root}/escaped-weights", "prompt": "hi", "max_tokens": 2}, 400, "adapter_id"),
    "adapter_config.json -> /etc/passwd": (
        "/v1/completions", {"model": "{root}/passwd-config", "prompt": "hi", "max_tokens": 2}, 400, "adapter_id"),
    "symlink loop": ("/v1/completions", {"model": "{root}/loop1", "prompt": "hi", "max_tokens": 2}, 400, "adapter_id"),
    "S3 outside the allowlist": ("/v1/completions", {"model": "s3://bucket/x", "prompt": "hi", "max_tokens": 2}, 403,
                                 "adapter_id"),
    "S3 whole bucket": ("/v1/completions", {"model": "s3://bucket", "prompt": "hi", "max_tokens": 2}, 400, "adapter_id"),
}


def fill_root(body: dict, root: Path) -> dict:
    return json.loads(json.dumps(body).replace("{root}", str(root)))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_gets_its_4xx_and_running_streams_are_untouched(
    case, server, engine, hostile_root, reference_outputs, audit_opens
):
    route, body, status, param = HOSTILE[case]
    with Streams(server.url) as streams, audit_opens() as opened:
        wait_until_streaming(engine)
        # json.dumps escapes lone surrogates as \udXXX, as a hostile client's JSON would carry them
        response = httpx.post(server.url + route, content=json.dumps(fill_root(body, hostile_root)),
                              headers={"content-type": "application/json"}, timeout=60)
        assert_4xx(response, status, param)
    assert streams.outputs() == reference_outputs
    outside = hostile_root.parent / "outside"
    assert not [path for path in opened if path.startswith(str(outside)) or path == "/etc/passwd"]


def test_the_bad_token_id_reproducer_on_its_own(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": "a", "prompt": [VOCAB], "max_tokens": 4})
    error = assert_4xx(response, 400, "prompt")["error"]
    assert f"[0, {VOCAB})" in error["message"]


def test_backtracking_rank_pattern_loads_and_the_server_stays_responsive(server, hostile_root):
    body = {"model": str(hostile_root / "backtracking-pattern"), "prompt": "hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


# --- body limit -------------------------------------------------------------------------------------


def test_a_20_mb_message_is_refused_with_413_before_it_is_parsed(server):
    body = json.dumps({"model": "", "messages": [{"role": "user", "content": "x" * (20 << 20)}]}).encode()
    started = time.monotonic()
    response = httpx.post(server.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 30  # a hang guard: it took 22.5 s and +1.7 GB before


def test_a_chunked_body_over_the_limit_is_refused_too(server):
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "", "prompt": "'
        for _ in range(10):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 413


def test_deeply_nested_json_on_invocations_is_a_400(server):
    body = "[" * 100_000 + "]" * 100_000
    response = httpx.post(server.url + "/invocations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


# --- disconnects ------------------------------------------------------------------------------------


def test_a_non_streaming_request_whose_client_leaves_frees_its_kv_blocks(server, engine):
    total = engine.stats().kv_blocks_total
    body = {"model": "a", "prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
    deadline = time.monotonic() + 20
    while engine.stats().kv_blocks_free != total and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats().kv_blocks_free == total
    assert engine.stats().num_running == 0


# --- adapter ids and what is listed -----------------------------------------------------------------


def test_unknown_adapter_offline_is_404_model_not_found_naming_where_it_looked(server):
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"model": "org/bar0", "messages": [{"role": "user", "content": "hi"}]})
    error = assert_4xx(response, 404, "model")["error"]
    assert error["code"] == "model_not_found"
    assert "packaged adapters (a, b)" in error["message"] and "local hub cache" in error["message"]
    assert "HF_HUB_OFFLINE" in error["message"]


def test_unknown_adapter_on_invocations_is_a_404_too(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "custom_inputs": {"adapter_id": "bar0"}}
    response = httpx.post(server.url + "/invocations", json=body)
    assert response.status_code == 404, response.text
    assert "does not exist" in response.json()["message"]


def test_spellings_of_one_local_path_are_one_model(server, hostile_root):
    spellings = [str(hostile_root / "bar1"), f"{hostile_root}/./bar1", f"{hostile_root}/././bar1",
                 f"{hostile_root}//bar1", f"{hostile_root}/bar1/../bar1"]
    for model in spellings:
        response = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        assert response.status_code == 200, response.text
    models = [entry["id"] for entry in httpx.get(server.url + "/v1/models").json()["data"]]
    assert models.count(str((hostile_root / "bar1").resolve())) == 1
    assert not [m for m in models if "bar1" in m and m != str((hostile_root / "bar1").resolve())]


def test_failed_adapters_are_not_listed(server, hostile_root):
    httpx.post(server.url + "/v1/completions", json={"model": str(hostile_root / "nan-weights"), "prompt": "hi"})
    models = [entry["id"] for entry in httpx.get(server.url + "/v1/models").json()["data"]]
    assert not [m for m in models if "nan-weights" in m]


def test_metric_labels_per_adapter_are_bounded(server, hostile_root):
    """300 spellings grew /metrics to 6.4 MB; now the first N ids keep a label and the rest are "other"."""
    from lorax_mlflow.server.metrics import DEFAULT_MAX_ADAPTER_LABELS, OTHER_LABEL

    for index in range(DEFAULT_MAX_ADAPTER_LABELS + 8):
        model = f"{hostile_root}/{'./' * index}bar1"
        response = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})
        assert response.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    adapters = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines() if 'adapter="' in line}
    assert OTHER_LABEL in adapters
    assert len(adapters) <= DEFAULT_MAX_ADAPTER_LABELS + 2  # + "base" and "other"


# --- secrets ------------------------------------------------------------------------------------------


def test_tokens_in_error_messages_are_redacted(server):
    body = {"model": "", "prompt": "hi", "max_tokens": 2, "seed": "Bearer hf_abcdefghijklmnop"}
    response = httpx.post(server.url + "/v1/completions", json=body)
    assert response.status_code == 400
    assert "hf_abcdefghijklmnop" not in response.text


# --- request chat templates, when the operator allows them -----------------------------------------------

BUDGET_BUSTERS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "a huge repeat": "{{ 'a' * 30000000 }}",
    "doubling in a namespace": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}{{ ns.s }}",
    "a huge pad": "{{ 'a' | center(100000000) }}",
    "a huge format width": "{{ '{:>100000000}'.format(1) }}",
    "unbounded recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


@pytest.fixture(scope="module")
def trusted_templates(engine):
    from lorax_mlflow.chat.templates import ChatTemplates

    return ChatTemplates(engine.tokenizer, trust_request_templates=True, max_render_seconds=0.5)


@pytest.mark.parametrize("case", list(BUDGET_BUSTERS))
def test_trusted_request_templates_fail_their_request_within_the_budgets(case, trusted_templates):
    from lorax_mlflow.errors import InvalidRequestError

    started = time.monotonic()
    with pytest.raises(InvalidRequestError) as caught:
        trusted_templates.render([{"role": "user", "content": "hi"}], chat_template=BUDGET_BUSTERS[case])
    assert caught.value.param == "chat_template"
    assert time.monotonic() - started < 30  # a hang guard; the nested loops ran 5.9 s, the repeat 32 s before


def test_trusted_request_template_renders(trusted_templates, engine):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ bos_token }}"
    ids = trusted_templates.render([{"role": "user", "content": "hi"}], chat_template=template)
    assert engine.tokenizer.decode(ids) == f"[user] hi\n{engine.tokenizer.bos_token}"


def test_base_template_renders_exactly_as_transformers_does(engine):
    from lorax_mlflow.chat.templates import ChatTemplates

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi {x} %d 10000000"}]
    expected = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ChatTemplates(engine.tokenizer).render(messages) == engine.tokenizer.encode(expected, add_special_tokens=False)


def test_non_finite_logprobs_never_reach_json():
    from lorax_mlflow.engine.outputs import MIN_LOGPROB, TokenLogprob

    entry = TokenLogprob(1, float("nan"), [(2, float("-inf")), (3, -0.5)])
    assert json.loads(json.dumps({"logprob": entry.logprob, "top": entry.top}, allow_nan=False)) == {
        "logprob": MIN_LOGPROB, "top": [[2, MIN_LOGPROB], [3, -0.5]]}
