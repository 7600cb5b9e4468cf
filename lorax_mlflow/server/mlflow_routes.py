"""/invocations: the body `mlflow models serve` takes for this ChatModel, answered by the same pyfunc model."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException

from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.server.common import off_loop
from lorax_mlflow.server.errors import HTTPStatusError
from lorax_mlflow.server.metrics import ServerMetrics
from lorax_mlflow.server.model_source import ModelHolder


def mlflow_router(holder: ModelHolder, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(tags=["MLflow"])

    @router.post("/invocations")
    async def invocations(request: Request):
        """Chat dict `{"messages", ...params, "custom_inputs"}` -> ChatCompletionResponse, as `mlflow models serve`."""
        record = metrics.request("invocations")
        predict = holder.model.predict
        if predict is None:
            record.close(501)
            raise HTTPStatusError("this server was started with a bare LoraxService, not an MLflow model",
                                  status=501, type_="not_implemented")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            record.close(400)
            raise InvalidRequestError(f"malformed JSON in the request body: {error}", code="invalid_json") from error
        if not isinstance(body, dict):
            record.close(400)
            raise InvalidRequestError("the request body must be a JSON object with `messages`")
        try:
            response = await off_loop(predict, body)
        except MlflowException as error:
            record.close(error.get_http_status_code())
            return JSONResponse(json.loads(error.serialize_as_json()), status_code=error.get_http_status_code())
        record.adapter = response.get("model") or "base"
        record.close(200)
        return response

    return router
