"""Property-based fuzzing of the gateway's OpenAPI schema (schemathesis) against the running gateway and
its real engine: no 5xx, and every response conforms to the schema.

Cases come from schemathesis' Hypothesis strategies, driven here directly: its pytest plugin does not
run under pytest 9.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

FUZZED = r"^/v1/(models|chat/completions|completions|files|fine_tuning/jobs)"
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance]


def test_no_server_errors_and_responses_fit_the_schema(gateway):
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json").include(path_regex=FUZZED)
    headers = {"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    calls = 0

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            nonlocal calls
            if isinstance(case.body, dict) and case.path.endswith("completions"):
                case.body["max_tokens"] = 2  # keep generations short on a CPU; bounds are tested elsewhere
                case.body.pop("max_completion_tokens", None)
                case.body.pop("min_tokens", None)
            response = case.call(base_url=gateway.url, headers=headers, timeout=120)
            calls += 1
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            case.validate_response(response, checks=CHECKS)

        check()
    assert calls >= 8 * 5
    assert gateway.client(gateway.tenants["beta"].key).models.list().data  # still serving
