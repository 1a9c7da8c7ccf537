"""The service's limits through the real app (its middlewares, routes and batcher) over
a stub run, no model: chunked uploads over the size limit 413, photos over the pixel
budget 413, a full photo queue 503 with Retry-After, a slow photo query 504, too many
connections 503 from uvicorn, and no server path in the answer when photo queries are
off."""

import io
import socket
import threading
import time
from http.client import HTTPConnection

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from fashionrec.errors import FashionrecError  # noqa: E402
from fashionrec.images import decode_image  # noqa: E402
from fashionrec.serve import ServeSettings, create_app, uvicorn_options  # noqa: E402


def png_bytes(width, height, mode="L"):
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, "PNG")
    return buf.getvalue()


class Answer:
    def to_dict(self):
        return {"query": {"kind": "upload", "path": "/secret"}, "items": []}


class StubRec:
    """Decodes each photo with the library (its real errors), holds a batch while
    ``gate`` is clear, and notes which requests it saw."""

    index_ = ()

    def __init__(self, library_pixels=None):
        self.library_pixels, self.seen = library_pixels, []
        self.gate, self.started = threading.Event(), threading.Event()
        self.gate.set()

    def stats(self):
        return {"items": 0}

    def recommend_batch(self, requests):
        self.seen.extend(r["k"] for r in requests)
        self.started.set()
        self.gate.wait(10)
        out = []
        for r in requests:
            try:
                decode_image(r["query"], "upload", max_pixels=self.library_pixels)
                out.append(Answer())
            except FashionrecError as exc:
                out.append(exc)
        return out


class StubWatcher:
    store_error, probe_interval = None, 1.0  # a file-backed run: its store always answers

    def __init__(self, run_dir, rec, photo_error=None):
        self.run_dir, self.rec, self.photo_error, self.ready = run_dir, rec, photo_error, False

    def warm(self):
        self.ready = True

    def watch(self):
        pass

    def stop(self):
        pass

    def current(self, reload=True):
        return self.rec


@pytest.fixture
def serve(tmp_path):
    """``serve(rec=None, photo_error=None, **settings)``: a TestClient of the real app
    over a stub run."""
    clients = []

    def start(rec=None, photo_error=None, **settings):
        watcher = StubWatcher(tmp_path, rec or StubRec(), photo_error)
        app = create_app(ServeSettings(str(tmp_path), **settings), watcher=watcher)
        client = TestClient(app).__enter__()
        clients.append((client, watcher.rec))
        deadline = time.monotonic() + 10
        while client.get("/api/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return client
    yield start
    for client, rec in clients:
        rec.gate.set()
        client.__exit__(None, None, None)


def photo(client, data=None, k=1):
    return client.post("/api/similar", files={"image": ("q.png", data or png_bytes(8, 8))},
                       data={"k": str(k)})


def multipart(data, boundary="b0undary"):
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"q.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def chunks(body, size=4096):
    for i in range(0, len(body), size):
        yield body[i:i + size]


def assert_error(response, status, text):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and text in body["error"], body


@pytest.mark.parametrize("route", ["/api/similar", "/api/items"])
def test_a_chunked_upload_over_the_limit_is_413(serve, route):
    client = serve(max_upload_bytes=20_000, api_key="k")
    body = multipart(png_bytes(8, 8) + b"\0" * 50_000)
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary",
               "Authorization": "Bearer k"}
    r = client.post(route, content=chunks(body), headers=headers)  # no Content-Length
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "larger than the limit of 20,000 bytes")
    assert_error(client.post(route, content=body, headers=headers), 413, "larger than")
    small = client.post("/api/similar", content=chunks(multipart(png_bytes(8, 8))),
                        headers=headers)
    assert small.status_code == 200, small.text
    assert "path" not in small.json()["query"]


def test_a_photo_over_the_pixel_budget_is_413_before_the_batcher(serve):
    rec = StubRec()
    client = serve(rec, max_pixels=10_000)
    assert_error(photo(client, png_bytes(200, 100)), 413,
                 "200 x 100 pixels is more than the limit of 10,000")
    bomb = png_bytes(20000, 20000, "1")  # 400 Mpx in a few KB: Pillow's own limit
    assert_error(photo(client, bomb), 413, "more pixels than the limit")
    assert rec.seen == []  # refused before the batcher
    assert photo(client, png_bytes(100, 100)).status_code == 200


def test_the_library_pixel_budget_is_413_and_a_foreign_format_400(serve):
    client = serve(StubRec(library_pixels=1_000))
    assert_error(photo(client, png_bytes(100, 100)), 413,
                 "100 x 100 pixels is more than the limit of 1,000")
    assert_error(photo(client, b"GIF89a not ours"), 400, "not a JPEG, PNG or WebP image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "GIF")
    assert_error(photo(client, buf.getvalue()), 400, "not a JPEG, PNG or WebP image")


def in_thread(call):
    out = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


def test_a_full_photo_queue_is_503_with_retry_after(serve):
    rec = StubRec()
    rec.gate.clear()
    client = serve(rec, max_queue=1, max_batch=1, max_wait_ms=0)
    first, first_out = in_thread(lambda: photo(client, k=1))
    assert rec.started.wait(5)  # the worker holds request 1
    second, second_out = in_thread(lambda: photo(client, k=2))
    deadline = time.monotonic() + 5
    while client.app.state.batcher.pending() < 1:  # request 2 waits in the queue
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = photo(client, k=3)
    assert_error(r, 503, "the photo queue is full")
    assert r.headers["Retry-After"] == "1"
    rec.gate.set()
    for thread in (first, second):
        thread.join(10)
    assert [o[0].status_code for o in (first_out, second_out)] == [200, 200]
    assert photo(client, k=4).status_code == 200 and rec.seen == [1, 2, 4]


def test_a_slow_photo_query_is_504_and_the_service_recovers(serve):
    rec = StubRec()
    rec.gate.clear()
    client = serve(rec, photo_timeout_s=0.3, max_batch=1, max_wait_ms=0)
    running, running_out = in_thread(lambda: photo(client, k=1))
    assert rec.started.wait(5)
    t = time.monotonic()
    assert_error(photo(client, k=2), 504, "not answered within 0.3 s")  # queued, dropped
    assert time.monotonic() - t < 5
    running.join(10)
    assert_error(running_out[0], 504, "not answered within")
    rec.gate.set()
    assert photo(client, k=3).status_code == 200
    assert rec.seen == [1, 3]  # request 2 timed out in the queue: never computed


def test_a_client_that_leaves_drops_its_photo_query():
    import asyncio
    from concurrent.futures import Future

    from fashionrec.serve.context import ApiError
    from fashionrec.serve.routers.photos import answer

    class Left:
        async def is_disconnected(self):
            return True

    future = Future()
    with pytest.raises(ApiError, match="client left"):
        asyncio.run(answer(Left(), future, timeout_s=5, poll_s=0.01))
    assert future.cancelled()  # the batcher skips it


def test_photo_queries_off_name_no_server_path(serve):
    reason = "backbone file /srv/models/tiny.keras does not exist"
    client = serve(photo_error=reason)
    r = photo(client)
    assert_error(r, 503, "the run's backbone cannot be loaded on this server")
    assert "/srv" not in r.text and "tiny.keras" not in r.text


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uvicorn_answers_503_beyond_max_connections(tmp_path):
    import uvicorn

    settings = ServeSettings(str(tmp_path), max_connections=2)
    app = create_app(settings, watcher=StubWatcher(tmp_path, StubRec()))
    port = free_port()
    options = uvicorn_options(settings, "127.0.0.1", port)
    assert options["limit_concurrency"] == 2
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        held = HTTPConnection("127.0.0.1", port, timeout=5)
        held.request("GET", "/api/health")
        assert held.getresponse().read() and True  # kept open: one connection
        other = HTTPConnection("127.0.0.1", port, timeout=5)
        other.request("GET", "/api/health")
        assert other.getresponse().status == 503
        held.close()
        other.close()
        deadline = time.monotonic() + 5
        while (status := get_status(port)) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(10)


def get_status(port):
    conn = HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/api/health")
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_pixel_check_never_touches_the_process_wide_warning_filters(monkeypatch):
    """``warnings.catch_warnings`` swaps the filters of every thread (the batcher's
    decodes run meanwhile): the header check does without it."""
    import warnings

    from fashionrec.serve.context import ApiError
    from fashionrec.serve.routers.photos import check_pixels

    def refuse(*args, **kwargs):
        raise AssertionError("warnings.catch_warnings is not thread-safe")
    monkeypatch.setattr(warnings, "catch_warnings", refuse)
    with pytest.raises(ApiError) as info:
        check_pixels(png_bytes(200, 100), 10_000)
    assert info.value.status == 413 and "200 x 100 pixels" in info.value.message
    with pytest.raises(ApiError) as info:
        check_pixels(png_bytes(20000, 20000, "1"), 40_000_000)
    assert info.value.status == 413
    check_pixels(png_bytes(100, 100), 10_000)  # within the budget: nothing raised
    check_pixels(b"not an image", 10_000)  # left to the library's 400
