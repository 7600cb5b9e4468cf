"""Hostile input against the real server: every reproducer of the hardening issue answers a 4xx
naming the parameter, nothing outside the adapter roots is opened, and 16 streams running
meanwhile finish normally with exactly the token ids they produce without the hostile request.

The server runs offline (``HF_HUB_OFFLINE=1``, an empty hub cache) over the tiny model, with
packaged adapters "a" and "b" and an adapter root holding good and bad adapters. Its engine core
runs in-process, so the audit hook that records opened files sees the core's opens too.
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
                           "max_num_seqs": 32, "max_model_len": 512, "in_process": True,
                           "grammar_compile_timeout_s": 0.5},
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

STREAM_ADAPTERS = ["a", "b", None]


def stream_body(index: int) -> dict:
    return {"inputs": f"Stream {index} counts:", "parameters": {
        "adapter_id": STREAM_ADAPTERS[index % len(STREAM_ADAPTERS)], "max_new_tokens": STREAM_TOKENS,
        "ignore_eos_token": True, "do_sample": False, "details": True}}


def read_stream(url: str, body: dict) -> list[int]:
    """The token ids of one LoRAX /generate_stream, checked to end normally after STREAM_TOKENS tokens."""
    token_ids, finish = [], None
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            assert "error" not in event, event
            token_ids.append(event["token"]["id"])
            if event.get("details"):
                finish = event["details"]["finish_reason"]
    assert finish == "length" and len(token_ids) == STREAM_TOKENS, (finish, token_ids)
    return token_ids


class Streams:
    """STREAMS greedy streams (adapters a, b and the base model) on background threads."""

    def __init__(self, url: str) -> None:
        self.results: dict[int, list[int] | BaseException] = {}
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

    def outputs(self) -> list[list[int]]:
        """Each stream's token ids (raises what a stream raised)."""
        outputs = []
        for index in range(STREAMS):
            result = self.results[index]
            if isinstance(result, BaseException):
                raise result
            outputs.append(result)
        return outputs


@pytest.fixture(scope="module")
def reference_outputs(server) -> list[list[int]]:
    """The token ids the 16 streams produce with nothing hostile around."""
    with Streams(server.url) as streams:
        pass
    return streams.outputs()


def wait_until_streaming(engine, minimum: int = 4, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().num_running < minimum and time.monotonic() < deadline:
        time.sleep(0.005)


def assert_4xx(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The expected status (a 4xx, or 200 for hostile input that must simply work), naming `param`."""
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
    "echo of a token id < 0": ("/v1/completions", {"model": "", "prompt": [-1], "echo": True, "max_tokens": 2}, 400,
                               "prompt"),
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
    "unknown adapter on /invocations": (
        "/invocations", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                         "custom_inputs": {"adapter_id": "bar0"}}, 404, None),
    "a grammar too slow to compile": (  # the server waits 0.5 s (grammar_compile_timeout_s) for a compile
        "/v1/completions", {"model": "", "prompt": "hi", "max_tokens": 2,
                            "guided_grammar": "root ::= " + " ".join(['"a"*'] * 150)}, 400, "guided_grammar"),
    # loads: the pattern is matched with a time budget, off the loop (it froze the server for 3 s per module)
    "catastrophic backtracking in rank_pattern": (
        "/v1/completions", {"model": "{root}/backtracking-pattern", "prompt": "hi", "max_tokens": 2}, 200, None),
}


def fill_root(body: dict, root: Path) -> dict:
    return json.loads(json.dumps(body).replace("{root}", str(root)))


def post_json(server, route: str, body: dict, root: Path) -> httpx.Response:
    # json.dumps escapes lone surrogates as \udXXX, as a hostile client's JSON would carry them
    return httpx.post(server.url + route, content=json.dumps(fill_root(body, root)),
                      headers={"content-type": "application/json"}, timeout=60)


def post_20_mb_message(server, root: Path, served) -> None:
    """It took 22.5 s and +1.7 GB to be rejected; now a 413 before the body is read."""
    body = json.dumps({"model": "", "messages": [{"role": "user", "content": "x" * (20 << 20)}]}).encode()
    response = httpx.post(server.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def post_chunked_body_over_the_limit(server, root: Path, served) -> None:
    """No Content-Length to refuse up front: counted as it arrives, refused once past the limit."""
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "", "prompt": "'
        for _ in range(10):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == 413


def post_deeply_nested_json_to_invocations(server, root: Path, served) -> None:
    body = "[" * 100_000 + "]" * 100_000
    response = httpx.post(server.url + "/invocations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


LEAVING = {  # non-streaming requests long enough that they cannot end before their client leaves
    "/v1/completions": {"model": "a", "prompt": "hello", "max_tokens": 450, "temperature": 0, "ignore_eos": True},
    "/generate": {"inputs": "hello", "parameters": {"adapter_id": "b", "max_new_tokens": 450,
                                                    "ignore_eos_token": True}},
    "/invocations": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 450,
                     "custom_inputs": {"adapter_id": "a", "ignore_eos": True}},
}


def leave_early(server, route: str) -> None:
    """Send a long non-streaming request and hang up before its answer."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + route, json=LEAVING[route], timeout=httpx.Timeout(5, read=0.3))


def leave_early_everywhere(server, root: Path, served) -> None:
    for route in LEAVING:
        leave_early(server, route)


def render_budget_busting_templates(server, root: Path, served) -> None:
    """With the operator's consent request templates render sandboxed: the nested loops ran 5.9 s and
    stalled every stream 4.4 s, the repeat took 32 s and 2.4 GB; now each is a 400 within its budget."""
    from lorax_mlflow.chat.templates import ChatTemplates

    service = served.service
    with pytest.MonkeyPatch.context() as patch:  # as `--trust-request-chat-template` starts it
        patch.setattr(service, "templates", ChatTemplates(service.engine.tokenizer, trust_request_templates=True,
                                                          max_render_seconds=0.5))
        for template in (BUDGET_BUSTERS["nested loops"], BUDGET_BUSTERS["a huge repeat"]):
            body = {"model": "", "messages": [{"role": "user", "content": "hi"}], "chat_template": template}
            assert_4xx(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 400, "chat_template")


HOSTILE_ACTIONS = {
    "a 20 MB message": post_20_mb_message,
    "a chunked body over the limit": post_chunked_body_over_the_limit,
    "deeply nested JSON on /invocations": post_deeply_nested_json_to_invocations,
    "non-streaming clients leaving on /v1, /generate and /invocations": leave_early_everywhere,
    "budget-busting request templates, trusted": render_budget_busting_templates,
}


@pytest.mark.parametrize("case", [*HOSTILE, *HOSTILE_ACTIONS])
def test_hostile_request_gets_its_4xx_and_running_streams_keep_their_tokens(
    case, hostile, engine, hostile_root, reference_outputs, audit_opens
):
    server, served = hostile
    with Streams(server.url) as streams, audit_opens() as opened:
        wait_until_streaming(engine)
        if case in HOSTILE:
            route, body, status, param = HOSTILE[case]
            assert_4xx(post_json(server, route, body, hostile_root), status, param)
        else:
            HOSTILE_ACTIONS[case](server, hostile_root, served)
    assert streams.outputs() == reference_outputs
    outside = hostile_root.parent / "outside"
    assert not [path for path in opened if path.startswith(str(outside)) or path == "/etc/passwd"]


def test_the_audit_hook_sees_the_cores_adapter_opens(server, hostile_root, audit_opens):
    """The check above means something: loading an adapter from the root shows up as opens."""
    with audit_opens() as opened:
        body = {"model": str(hostile_root / "bar1"), "prompt": "hi", "max_tokens": 1}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert [path for path in opened if path.startswith(str(hostile_root / "bar1"))]


def test_the_bad_token_id_reproducer_on_its_own(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": "a", "prompt": [VOCAB], "max_tokens": 4})
    error = assert_4xx(response, 400, "prompt")["error"]
    assert f"[0, {VOCAB})" in error["message"]


# --- disconnects ------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", list(LEAVING))
def test_a_non_streaming_request_whose_client_leaves_is_aborted_and_frees_its_kv_blocks(route, server, engine):
    total = engine.stats().kv_blocks_total
    steps_before = engine.stats().num_steps
    leave_early(server, route)
    deadline = time.monotonic() + 60
    while (engine.stats().kv_blocks_free != total or engine.stats().num_running) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats().kv_blocks_free == total
    assert engine.stats().num_running == 0
    # aborted, not run to its end: a finished request would have taken a step for each of its 450 tokens
    assert engine.stats().num_steps - steps_before < 450
    route_label = {"/v1/completions": "completions", "/generate": "generate", "/invocations": "invocations"}[route]
    metrics = httpx.get(server.url + "/metrics").text
    assert [line for line in metrics.splitlines()
            if line.startswith("lorax_requests_total") and f'route="{route_label}"' in line and 'status="499"' in line]


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


SECRET = "hf_SecretTokenOfAUser123"


def test_no_log_line_carries_a_secret(hostile):
    """What `lorax-mlflow serve` logs, through its own handlers and uvicorn's: a token in the query string
    (uvicorn's access line), in an Authorization header, in a body that fails to parse or to validate,
    or in an exception's message (uvicorn's "Exception in ASGI application" traceback)."""
    import io
    import logging

    from lorax_mlflow.redact import install_log_redaction, uvicorn_log_config

    _, served = hostile
    logs = io.StringIO()
    config = uvicorn_log_config()  # as `lorax-mlflow serve` runs uvicorn, its streams captured here
    for handler in config["handlers"].values():
        handler["stream"] = logs
    root_handler = logging.StreamHandler(logs)  # as `lorax-mlflow serve` sets up the application's logging
    logging.getLogger().addHandler(root_handler)
    install_log_redaction()
    package = logging.getLogger("lorax_mlflow")
    level = package.level
    package.setLevel(logging.DEBUG)
    try:
        with running_server(served, uvicorn_options={"log_config": config, "log_level": "info"}) as logged:
            bearer = {"authorization": f"Bearer {SECRET}", "content-type": "application/json"}
            unparsable = '{"model": "", "api_token": "' + SECRET + '", "prompt": '
            assert httpx.post(logged.url + f"/v1/completions?api_token={SECRET}", content=unparsable,
                              headers=bearer).status_code == 400
            invalid = {"model": "", "prompt": "hi", "api_token": SECRET, "seed": f"api_token={SECRET}"}
            assert httpx.post(logged.url + "/v1/completions", json=invalid, headers=bearer).status_code == 400
            mlflow_invalid = {"messages": [{"role": "user", "content": 5}], "api_token": SECRET}
            assert httpx.post(logged.url + "/invocations", json=mlflow_invalid, headers=bearer).status_code == 400
            try:
                raise KeyError(f"Authorization: Bearer {SECRET}")
            except KeyError:
                logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    finally:
        logging.getLogger().removeHandler(root_handler)
        package.setLevel(level)
    text = logs.getvalue()
    assert "/v1/completions?api_token=[REDACTED]" in text  # the access line is there, redacted
    assert "Exception in ASGI application" in text and "Traceback" in text
    assert "POST /v1/completions -> 400" in text  # the application's own 4xx line
    assert SECRET not in text


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
