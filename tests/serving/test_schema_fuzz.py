"""The OpenAPI schema fuzzed with schemathesis against the live server: never a 5xx.

Driven through hypothesis directly (``operation.as_strategy``): schemathesis's pytest plugin
does not run under this project's pytest version.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from tests.serving.conftest import API_KEY


def _operations(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema.config.update(base_url=server.url)
    return {
        f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())
    }


def _fuzz(operation, mode, session, statuses: list[int]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"  # reach past the model check, into decoding
        response = case.call(
            session=session, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        )
        statuses.append(response.status_code)
        assert response.status_code < 500, (operation.path, case.body, response.text)

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx(server, mode):
    operations = _operations(server)
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= set(
        operations
    )
    session, statuses = requests.Session(), []
    for operation in operations.values():
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to break: no parameters, no body
        _fuzz(operation, mode, session, statuses)
    if mode is GenerationMode.POSITIVE:
        assert statuses.count(200) > 2  # some fuzzed requests were decoded, not just refused
    assert session.get(f"{server.url}/health", timeout=10).status_code == 200
