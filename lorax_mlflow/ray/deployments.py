"""Ray Serve deployments: N engine replicas behind an ingress that routes by adapter id.

- `LoraxReplica` loads an MLflow model of ours (one engine per replica) and answers forwarded
  HTTP requests by running them through the same FastAPI app `lorax-mlflow serve` serves
  (`create_app`), so routes, validation, error shapes and streams are identical.
- `LoraxIngress` receives every HTTP request, reads the adapter the body names (as the routes
  do: ``adapter_id`` or OpenAI ``model``; LoRAX ``parameters.adapter_id``) and forwards it with
  that id as Serve's multiplexed model id, which `AdapterOwnerRouter` (the replicas' request
  router) reads: each adapter goes to its owner replica by rendezvous hashing, to its next one
  while the owner is overloaded, so each replica's adapter cache covers about 1/N of the adapters.
  Base-model requests and merges spread by load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lorax_mlflow.ray.adapter_owner import LoadBound
from lorax_mlflow.ray.adapter_router import AdapterOwnerRouter
from lorax_mlflow.ray.asgi_call import HttpRequest, HttpResponseStart, call_asgi

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-lorax-replica"
"""Response header naming the replica that answered (its actor name in the "serve" namespace)."""
_ATTEMPTS = 2
"""Tries of a request whose replica fails before answering (nothing was sent yet, so it is safe)."""
ADAPTER_LOADS_HEADER = "x-lorax-adapter-loads"
"""Response header: adapter weight loads on that replica so far (for routing measurements)."""
_LORAX_ROUTES = ("/", "/generate", "/generate_stream")


def routed_adapter_id(path: str, body: bytes) -> str:
    """The adapter a request names, '' when it names none or a merge (no affinity then)."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    if path in _LORAX_ROUTES:
        data = data.get("parameters")
    elif path == "/invocations":
        data = data.get("custom_inputs") or data.get("params") or data
    if not isinstance(data, dict) or data.get("merged_adapters"):
        return ""
    adapter_id = data.get("adapter_id") or data.get("model") or ""
    return adapter_id if isinstance(adapter_id, str) else ""


class LoraxReplica:
    """One engine over an MLflow model, answering requests through the project's FastAPI app."""

    def __init__(self, model_uri: str | None = None, engine_env: dict[str, str] | None = None,
                 preload_adapters: dict[str, str] | None = None) -> None:
        os.environ.update(engine_env or {})  # LORAX_* engine overrides, read when the engine is built
        from lorax_mlflow.server import create_app, load_served_model
        from lorax_mlflow.server.adapter_admin import preload_adapters as preload

        if model_uri is None:
            from lorax_mlflow.cli import default_model_path

            model_uri = str(default_model_path())
        self.served = load_served_model(model_uri)
        preload(self.served.service, preload_adapters or {})
        self.app = create_app(self.served)
        self.adapters = self.served.service.engine.adapters
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        logger.info("replica %s ready: base %s, host cache for %d adapters", self.replica_id,
                    self.served.service.base_model_name, self.adapters.host_capacity())

    def base_model_name(self) -> str:
        return self.served.service.base_model_name

    def adapter_loads(self) -> int:
        return sum(stats.loads for stats in self.adapters.adapter_stats().values())

    async def handle(self, request: HttpRequest):
        """Stream the app's answer: an `HttpResponseStart`, then body chunks."""
        async for item in call_asgi(self.app, request):
            if isinstance(item, HttpResponseStart):
                item.headers += [(REPLICA_HEADER.encode(), self.replica_id.encode()),
                                 (ADAPTER_LOADS_HEADER.encode(), str(self.adapter_loads()).encode())]
            yield item

    async def check_health(self) -> None:
        """Serve's periodic health check: the app's own /health (replaced by Serve when it fails)."""
        async for item in call_asgi(self.app, HttpRequest("GET", "/health")):
            if isinstance(item, HttpResponseStart) and item.status != 200:
                raise RuntimeError(f"/health answered {item.status}")

    def __del__(self) -> None:
        served = getattr(self, "served", None)
        if served is not None:
            served.service.engine.shutdown()


class LoraxIngress:
    """HTTP entry point: forwards each request to a replica chosen by its adapter id."""

    def __init__(self, replicas, affinity: bool = True) -> None:
        self.replicas = replicas
        self.affinity = affinity
        self._base_model_name: str | None = None

    async def _base_name(self) -> str:
        if self._base_model_name is None:
            self._base_model_name = await self.replicas.base_model_name.remote()
        return self._base_model_name

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        forwarded = HttpRequest(
            method=request.method, path=request.url.path, query_string=request.url.query.encode(),
            headers=[(k.encode(), v.encode()) for k, v in request.headers.items()], body=body,
        )
        adapter_id = routed_adapter_id(forwarded.path, body) if self.affinity else ""
        if adapter_id and adapter_id == await self._base_name():
            adapter_id = ""
        handle = self.replicas.options(stream=True, multiplexed_model_id=adapter_id)
        for attempt in range(1, _ATTEMPTS + 1):
            responses = handle.handle.remote(forwarded)
            try:
                start = await responses.__anext__()
                break
            except Exception as error:  # the replica died (or was unreachable) before answering
                logger.warning("replica failed before answering %s (try %d): %s", forwarded.path, attempt, error)
        else:
            return JSONResponse(_error_body("the replicas serving this request failed; retry"), status_code=503)
        response = StreamingResponse(_body_chunks(responses, start), status_code=start.status)
        response.raw_headers = [(k, v) for k, v in start.headers]
        return response


async def _body_chunks(responses, start: HttpResponseStart):
    """The body as the replica streams it; if the replica dies mid-stream, an SSE stream ends with
    an error event and [DONE] (what our streaming routes send for any failure), others just end.
    A client that disconnects cancels the replica's request, which aborts its engine request."""
    try:
        async for chunk in responses:
            yield chunk
    except asyncio.CancelledError:  # the client went away: stop the replica's request too
        responses.cancel()
        raise
    except Exception as error:
        logger.warning("replica failed mid-response: %s", error)
        content_type = dict(start.headers).get(b"content-type", b"")
        if content_type.startswith(b"text/event-stream"):
            message = _error_body("the replica serving this stream failed; retry the request")
            yield f"data: {json.dumps(message)}\n\ndata: [DONE]\n\n".encode()


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "service_unavailable", "param": None,
                      "code": "replica_failed"}}


def build_app(
    model_uri: str | None = None,
    *,
    replicas: int = 2,
    num_cpus_per_replica: float = 1.0,
    num_gpus_per_replica: float = 0,
    engine_env: dict[str, str] | None = None,
    max_ongoing_requests: int = 64,
    affinity: bool = True,
    overload_slack: int = LoadBound.slack,
    overload_ratio: float = LoadBound.ratio,
    preload_adapters: dict[str, str] | None = None,
):
    """The Serve application: `replicas` engines over `model_uri` (None: the embedded default model).

    ``engine_env``: LORAX_* engine overrides for every replica (e.g. ``{"LORAX_NUM_THREADS": "1"}``).
    ``affinity=True`` routes each adapter to its owner replica (`AdapterOwnerRouter`), to its next
    replica while the owner carries more than ``overload_slack`` requests above the least-loaded
    replica and more than ``overload_ratio`` times its load (`LoadBound`); ``affinity=False`` routes
    without adapter ids (Serve's default load-based routing), the baseline
    `benchmarks/scale_out.py` compares with.
    """
    routing = {}
    if affinity:
        routing["request_router_config"] = RequestRouterConfig(
            request_router_class=AdapterOwnerRouter,
            request_router_kwargs={"slack": overload_slack, "ratio": overload_ratio})
    replica = serve.deployment(
        LoraxReplica, name="LoraxReplica", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica}, **routing,
    ).bind(model_uri, engine_env, preload_adapters)
    ingress = serve.deployment(
        LoraxIngress, name="LoraxIngress", max_ongoing_requests=max_ongoing_requests * max(replicas, 1) * 2,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica, affinity)


def app_builder(args: dict[str, Any]):
    """`serve run` / Serve config entry point: ``import_path: lorax_mlflow.ray:app_builder``."""
    return build_app(**args)
