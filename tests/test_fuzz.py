"""The HTTP API fuzzed from its own OpenAPI spec (schemathesis): every route, a bounded
number of generated requests each, sent with the API key to a real uvicorn server on
127.0.0.1 serving a private copy of the tiny run. No request may get a 5xx, and every
answer must hold to its documented status codes, content type and schema."""

import shutil
import socket
import threading
import time
from http.client import HTTPConnection

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fashionrec.serve import ServeSettings, create_app, uvicorn_options  # noqa: E402

KEY = "fuzz-key"
EXAMPLES = 25  # generated requests per route (plus schemathesis' explicit examples)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_of(port, path):
    conn = HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@pytest.fixture(scope="module")
def live_server(trained_run, tmp_path_factory):
    """The real app over a copy of the tiny run, in uvicorn on 127.0.0.1 (its own
    thread), writes on; yields its base URL once the model is warm."""
    import uvicorn

    run = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(trained_run[1], run)
    settings = ServeSettings(str(run), api_key=KEY, max_upload_bytes=200_000,
                             photo_timeout_s=20.0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings),
                                           **uvicorn_options(settings, "127.0.0.1", port)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while status_of(port, "/api/ready") != 200:
            assert time.monotonic() < deadline and thread.is_alive(), "never became ready"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


# every operation of the spec (the test checks the list is complete)
OPERATIONS = [("GET", "/api/health"), ("GET", "/api/ready"), ("GET", "/api/stats"),
              ("GET", "/api/items"), ("POST", "/api/items"),
              ("GET", "/api/items/{item_id}/similar"), ("GET", "/api/items/{item_id}/image"),
              ("GET", "/api/items/{item_id}"), ("DELETE", "/api/items/{item_id}"),
              ("POST", "/api/similar")]


@pytest.fixture(scope="module")
def api_schema(live_server):
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    found = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert found == set(OPERATIONS), found ^ set(OPERATIONS)
    return schema


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_5xx_and_every_answer_holds_to_the_spec(api_schema, live_server, method, path):
    operation = api_schema[path][method]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def fuzz(case):
        case.call_and_validate(
            base_url=live_server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance])
    fuzz()
