"""Schema-driven fuzzing of the live service with schemathesis.

A real uvicorn server (tests/service_fixtures.LiveServer) on the small test
bundle; its own /openapi.json is loaded with ``schemathesis.openapi.from_url``
(schemathesis 4.x) and every operation gets ``MAX_EXAMPLES`` generated
requests (positive: valid by the schema; for POST /detect also negative:
invalid by the schema), derandomized so that a run is reproducible.  Each
response must pass the checks: no 5xx, the status code is documented for the
operation, the Content-Type is the documented one, and the body validates
against the documented schema.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

# Imported plainly: a missing fuzzer is a failed setup, never a silent skip.
import hypothesis  # noqa: E402
import requests  # noqa: E402
import schemathesis  # noqa: E402

from hypothesis import HealthCheck, Phase  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from service_fixtures import LiveServer, fmnist_images, png_of  # noqa: E402

torch.set_num_threads(1)

# Generated requests per operation and mode; FUZZ_MAX_EXAMPLES raises it for a longer hunt.
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "50"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = [("POST", "/detect"), ("GET", "/health"), ("GET", "/ready"), ("GET", "/model"), ("GET", "/metrics")]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [("POST", "/detect", GenerationMode.NEGATIVE)]


@pytest.fixture(scope="session")
def fuzz_bundle(service_bundle) -> Path:
    return service_bundle


@pytest.fixture(scope="module")
def live(fuzz_bundle):
    from pathguard.service.settings import Settings

    with LiveServer(Settings(bundle=fuzz_bundle, batch_wait_ms=2, torch_threads=1)) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", timeout=30)


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def test_schema_covers_every_operation(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS), "an operation was added or removed: update OPERATIONS"


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_fuzz_operation(api_schema, live, session, method, path, mode):
    operation = api_schema[path][method]
    statuses: Counter = Counter()

    @hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call_and_validate(base_url=live.url, session=session, checks=CHECKS, timeout=30)
        statuses[response.status_code] += 1

    run()
    print(f"\n{method} {path} ({mode.value}): {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert sum(statuses.values()) > 0
    assert not any(code >= 500 for code in statuses)


def test_real_images_pass_the_same_checks(api_schema, live, session):
    """Generated bodies are almost never real images: send real ones (JSON and
    multipart, with and without the path) through the same checks, so that the
    200 answers are validated against the schema too."""
    operation = api_schema["/detect"]["POST"]
    images = fmnist_images(3)
    pngs = [png_of(image) for image in images]
    payload = [{"data": base64.b64encode(p).decode(), "filename": f"real-{i}.png"} for i, p in enumerate(pngs)]
    for include_path in (False, True):
        case = operation.Case(body={"images": payload, "include_path": include_path}, media_type="application/json")
        response = case.call_and_validate(base_url=live.url, session=session, checks=CHECKS, timeout=30)
        assert response.status_code == 200, response.text
        assert [r["filename"] for r in response.json()["results"]] == [p["filename"] for p in payload]
        assert ("layer_paths" in response.json()["results"][0]) is include_path
    case = operation.Case(body={"files": pngs, "include_path": True}, media_type="multipart/form-data")
    response = case.call_and_validate(base_url=live.url, session=session, checks=CHECKS, timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == len(pngs)
