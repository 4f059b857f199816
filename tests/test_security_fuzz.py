"""schemathesis against the server's own /openapi.json: no response >= 500, every error in OpenAI's shape."""
from __future__ import annotations

import json

import pytest

from hardening_server import KEY_ADMIN, auth, secure_server, shared_cache

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

__all__ = ["shared_cache"]
EXAMPLES = {"/v1/completions": 50, "/v1/chat/completions": 50}  # the rest: DEFAULT_EXAMPLES each
DEFAULT_EXAMPLES = 8


@pytest.fixture(scope="module")
def srv(shared_cache, tmp_path_factory):
    # a short context keeps every generated request cheap; tiny limits make the bounds reachable by chance
    with secure_server(shared_cache, tmp_path_factory.mktemp("fuzz") / "adapters", max_model_len=64,
                       max_body_bytes=256 << 10, max_adapter_bytes=512 << 10) as s:
        yield s


def _check(case, response) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.content[:500]!r} for {case.body!r:.300}"
    if response.status_code >= 400:
        body = json.loads(response.content)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), where
        assert err["message"] and isinstance(err["type"], str), where


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz(srv, mode):
    schema = schemathesis.openapi.from_dict(srv.app.openapi())
    generation_mode = schemathesis.GenerationMode(mode)
    ran = []
    for result in schema.get_all_operations():
        op = result.ok()
        n = EXAMPLES.get(op.path, DEFAULT_EXAMPLES)

        @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=generation_mode))
        def run(case):
            response = case.call(base_url=srv.base, headers=auth(KEY_ADMIN), timeout=60)
            _check(case, response)
            ran.append(case.formatted_path)

        try:
            run()
        except Unsatisfiable:
            assert mode == "negative", op.path  # e.g. GET /health: nothing there can be made invalid
    assert {"/v1/completions", "/v1/chat/completions", "/v1/adapters"} <= set(ran)
    assert srv.runtime.async_engine.dead is None and srv.app.state.admission.in_flight == 0

