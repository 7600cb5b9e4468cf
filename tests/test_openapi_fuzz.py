"""Schemathesis against the server's own OpenAPI document: generated requests (valid and not) for
every operation, each response checked for a server error, an undocumented status, a wrong
content type, or a body that does not match the documented schema.

Bounded: 200 examples per operation (derandomized, so CI runs the same cases), generation capped
at 2 new tokens (a hook lowers every generated max_tokens / max_new_tokens and n / best_of), the
tiny model: about 2 minutes on 2 cores.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 200
MAX_NEW_TOKENS = 2
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(server):
    loaded = schemathesis.openapi.from_url(server.url + "/openapi.json")
    loaded.hook("map_body")(lambda context, body: _cap_generation(body))
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


def _cap_generation(body: Any) -> Any:
    """Keep generated requests cheap: at most MAX_NEW_TOKENS new tokens, no n / best_of fan-out."""
    if not isinstance(body, dict):
        return body
    for field in ("max_tokens", "max_completion_tokens", "max_new_tokens"):
        if isinstance(body.get(field), int) and not isinstance(body.get(field), bool):
            body[field] = max(min(body[field], MAX_NEW_TOKENS), -1)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_NEW_TOKENS
    for field in ("n", "best_of"):
        if isinstance(body.get(field), int) and not isinstance(body.get(field), bool) and body[field] > 2:
            body[field] = 2
    parameters = body.get("parameters")
    if isinstance(parameters, dict):
        _cap_generation(parameters)
        parameters.pop("max_tokens", None)
        parameters.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    return body


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_every_response_is_documented_and_no_request_is_a_server_error(case):
    case.call_and_validate(checks=CHECKS, timeout=60)
