"""The service through FastAPI's TestClient: every route and every error it promises,
writes behind an API key, updates made while queries run, reloads of changes made by
other processes."""

import io
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serving import serve_copy  # noqa: E402

from fashionrec import Recommender  # noqa: E402
from fashionrec.serve import ServeSettings, create_app  # noqa: E402
from fashionrec.serve.batcher import MicroBatcher  # noqa: E402

KEY = "s3cret-key"


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def served(trained_run, tmp_path):
    """A private copy of the tiny Fashion-MNIST run, served with writes on."""
    yield from serve_copy(trained_run[1], tmp_path / "run", KEY)


@pytest.fixture(scope="module")
def served_once(trained_run, tmp_path_factory):
    """One served copy for tests that change nothing (warming the model takes a while)."""
    yield from serve_copy(trained_run[1], tmp_path_factory.mktemp("shared") / "run", KEY)


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_probes_stats_metrics_and_page(served):
    client, run = served
    assert client.get("/api/health").json() == {"status": "ok"}
    assert client.get("/api/ready").json() == {"ready": True}
    stats = client.get("/api/stats").json()
    rec = Recommender.load(run)
    assert stats["items"] == 24 and stats["classes"] == list(rec.class_names)
    assert stats["run"]["run_id"] == rec.run_id_ and stats["index"]["search"] == "exact"
    client.get("/api/items/3/similar")
    text = client.get("/metrics").text
    assert 'fashionrec_requests_total{method="GET",route="/api/items/{item_id:path}/similar"' \
           ',status="200"} 1.0' in text
    assert "fashionrec_items 24.0" in text and "fashionrec_request_seconds_bucket" in text
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/api/items/{item_id}/similar" in schema["paths"]
    form = schema["paths"]["/api/items"]["post"]["requestBody"]["content"]
    assert form["multipart/form-data"]["schema"]["required"] == ["images"]
    assert client.get("/docs").status_code == 200


def test_similar_to_an_item_matches_the_library(served):
    client, run = served
    rec = Recommender.load(run)
    expected = rec.recommend(item=3, k=5, same_class=True).to_dict()
    got = client.get("/api/items/3/similar", params={"k": 5, "same_class": "true"}).json()
    assert [i["id"] for i in got["items"]] == [i["id"] for i in expected["items"]]
    assert [round(i["distance"], 5) for i in got["items"]] == [
        round(i["distance"], 5) for i in expected["items"]]
    assert got["query"]["kind"] == "item" and got["query"]["filter"].startswith("class ")
    assert got["items"][0]["image_url"] == f"/api/items/{got['items'][0]['id']}/image"


def test_similar_to_a_photo_matches_the_library(served, tmp_path):
    client, run = served
    rec = Recommender.load(run)
    image, _ = rec.query_image(30)
    (tmp_path / "q.png").write_bytes(png_bytes(image))
    expected = rec.recommend(str(tmp_path / "q.png"), k=4)
    got = client.post("/api/similar", files={"image": ("q.png", png_bytes(image))},
                      data={"k": "4"}).json()
    assert got["query"]["kind"] == "upload"
    assert got["query"]["predicted_class"] == expected.query["predicted_class"]
    assert [i["id"] for i in got["items"]] == [i.id for i in expected.items]
    np.testing.assert_allclose([i["distance"] for i in got["items"]],
                               [i.distance for i in expected.items], rtol=1e-5)


def test_browse_metadata_and_pictures(served):
    client, run = served
    page = client.get("/api/items", params={"offset": 20, "limit": 10}).json()
    assert page["total"] == 24 and [i["id"] for i in page["items"]] == [20, 21, 22, 23]
    one_class = client.get("/api/items", params={"class": "Trouser"}).json()
    assert one_class["items"] and {i["class_name"] for i in one_class["items"]} == {"Trouser"}
    assert client.get("/api/items/5").json()["id"] == 5
    picture = client.get("/api/items/5/image")
    assert picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (28, 28)


@pytest.mark.parametrize("method,url,kwargs,status,message", [
    ("get", "/api/items/99999/similar", {}, 404, "not in the catalog"),
    ("get", "/api/items/abc", {}, 404, "not in the catalog"),
    ("get", "/api/items/..%2F..%2Fetc%2Fpasswd/image", {}, 404, "not in the catalog"),
    ("get", "/api/items/%2Fetc%2Fpasswd/image", {}, 404, "not in the catalog"),
    ("get", "/api/items/3/similar?k=0", {}, 422, "k"),
    ("get", "/api/items/3/similar?k=abc", {}, 422, "k"),
    ("get", "/api/items/3/similar?k=101", {}, 422, "k must be at most 100"),
    ("get", "/api/items/3/similar?k=50", {}, 422, "more than the catalog"),
    ("get", "/api/items/3/similar?category=NoSuchThing", {}, 422, "no other catalog item"),
    ("get", "/api/items?class=Nope", {}, 422, "not one of this run's classes"),
    ("get", "/api/items?limit=0", {}, 422, "limit"),
    ("get", "/api/nothing", {}, 404, "there is no /api/nothing here"),
    ("post", "/api/similar", {"files": {"image": ("x.png", b"not an image")}}, 400,
     "cannot read the uploaded image"),
    ("post", "/api/similar", {"files": {"image": ("x.png", b"")}}, 400, "empty"),
    ("post", "/api/similar", {"data": {"k": "3"}}, 422, "image"),
    ("post", "/api/similar", {"files": {"image": ("x.png", b"\0" * 300_000)}}, 413,
     "larger than the limit"),
    ("delete", "/api/items/3", {}, 401, "Authorization: Bearer"),
    ("delete", "/api/items/3", {"headers": {"Authorization": "Bearer wrong"}}, 403,
     "not valid"),
    ("delete", "/api/items/999", {"headers": {"Authorization": f"Bearer {KEY}"}}, 404,
     "not in the catalog"),
])
def test_errors_are_one_sentence_json(served_once, method, url, kwargs, status, message):
    client, _ = served_once
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and message in body["error"], body
    assert "Traceback" not in response.text and "\n" not in body["error"]


def test_a_decompression_bomb_is_refused(served):
    client, _ = served
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # 400 Mpx in a few KB
    assert len(buf.getvalue()) < 200_000
    r = client.post("/api/similar", files={"image": ("bomb.png", buf.getvalue())})
    assert r.status_code == 413 and "more pixels than the limit" in r.json()["error"]


def test_an_unexpected_failure_is_500_with_a_request_id_only(served, monkeypatch):
    client, run = served
    watcher = client.app.state.watcher
    monkeypatch.setattr(watcher.rec, "recommend", lambda *a, **k: 1 / 0)
    r = TestClient(client.app, raise_server_exceptions=False).get("/api/items/3/similar")
    assert r.status_code == 500
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["request_id"] in body["error"]
    assert "ZeroDivision" not in r.text and r.headers["X-Request-ID"] == body["request_id"]


def test_writes_are_off_without_a_key(trained_run):
    _, run_dir = trained_run
    with TestClient(create_app(ServeSettings(str(run_dir)))) as client:
        r = client.delete("/api/items/3", headers=auth())
        assert r.status_code == 403 and "writes are off" in r.json()["error"]
        assert "access-control-allow-origin" not in client.get(
            "/api/health", headers={"Origin": "http://shop.example"}).headers


def test_cors_is_a_setting(trained_run):
    _, run_dir = trained_run
    app = create_app(ServeSettings(str(run_dir), cors_origins=("http://shop.example",)))
    with TestClient(app) as client:
        r = client.get("/api/health", headers={"Origin": "http://shop.example"})
        assert r.headers["access-control-allow-origin"] == "http://shop.example"


def test_add_and_remove_through_the_api(served):
    client, run = served
    rec = Recommender.load(run)
    image, _ = rec.query_image(30)
    r = client.post("/api/items", headers=auth(),
                    files=[("images", ("new.png", png_bytes(image)))],
                    data={"ids": ["10001"], "labels": ["Trouser"]})
    assert r.status_code == 200, r.text
    assert r.json()["n_added"] == 1 and r.json()["items"] == 25
    assert client.get("/api/items/10001").json()["class_name"] == "Trouser"
    assert client.get("/api/items/10001/image").status_code == 200
    found = client.post("/api/similar", files={"image": ("q.png", png_bytes(image))},
                        data={"k": "1"}).json()
    assert found["items"][0]["id"] == 10001
    assert client.delete("/api/items/10001", headers=auth()).json() == {
        "removed": 10001, "items": 24}
    assert client.get("/api/items/10001").status_code == 404
    r = client.post("/api/items", headers=auth(),
                    files=[("images", ("new.png", png_bytes(image)))], data={"ids": ["7"]})
    assert r.status_code == 422 and "test image 7" in r.json()["error"]
    r = client.post("/api/items", headers=auth(),
                    files=[("images", ("bad.png", b"not an image"))], data={"ids": ["10002"]})
    assert r.status_code == 422 and "nothing was added: 10002" in r.json()["error"]
    r = client.post("/api/items", headers=auth(),
                    files=[("images", ("new.png", png_bytes(image)))],
                    data={"ids": ["10003"], "labels": ["NoSuchClass"]})
    assert r.status_code == 422 and "unknown class" in r.json()["error"]
    assert Recommender.load(run).index_.metadata["n_updates"] == 2  # on disk too
    assert sorted(p.name.split("-", 1)[1] for p in (run / "uploads").iterdir()) == []


def uploads_of(run):
    folder = run / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_no_paths(response, run):
    assert response.status_code == 200, response.text
    assert str(run.resolve()) not in response.text and str(run) not in response.text
    assert "/tmp" not in response.text and '"path"' not in response.text, response.text


def test_no_answer_holds_a_file_path(served):
    """Items with a picture file (added through the API) are answered without it."""
    client, run = served
    photo = png_bytes(Recommender.load(run).query_image(30)[0])
    r = client.post("/api/items", headers=auth(), files=[("images", ("new.png", photo))],
                    data={"ids": ["10001"]})
    assert r.status_code == 200 and len(uploads_of(run)) == 1, r.text
    assert_no_paths(r, run)
    for url in ["/api/items?offset=20", "/api/items/10001", "/api/items/10001/similar?k=3",
                "/api/items/3/similar?k=24", "/api/stats"]:
        assert_no_paths(client.get(url), run)
    assert_no_paths(client.post("/api/similar", files={"image": ("q.png", photo)},
                                data={"k": "5"}), run)
    r = client.post("/api/items", headers=auth(), files=[("images", ("bad.png", b"no image"))],
                    data={"ids": ["10002"]})
    assert r.status_code == 422 and "bad.png" in r.json()["error"], r.text
    assert str(run.resolve()) not in r.text and "/tmp" not in r.text, r.text
    assert len(uploads_of(run)) == 1
    assert client.delete("/api/items/10001", headers=auth()).status_code == 200
    assert uploads_of(run) == []


def body_reads(app, path, body, headers=()):
    """How often ``app`` asked for the body of an unauthenticated POST to ``path``."""
    import asyncio

    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("test", 80),
             "client": ("test", 1), "headers": [(b"content-type", b"multipart/form-data; "
                                                 b"boundary=x"), *headers]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401, sent
    return len(reads)


def test_a_refused_or_failed_add_leaves_no_upload(served, monkeypatch):
    client, run = served
    photo = png_bytes(Recommender.load(run).query_image(30)[0])
    files = [("images", ("a.png", photo)), ("images", ("b.png", photo))]
    for headers, status in [({}, 401), (auth("wrong"), 403)]:
        r = client.post("/api/items", headers=headers, files=files, data={"ids": ["1", "2"]})
        assert r.status_code == status and uploads_of(run) == [], r.text
    assert body_reads(client.app, "/api/items", b"x" * 1000) == 0  # refused before reading
    # two files of the same name and no ids: the same id twice
    r = client.post("/api/items", headers=auth(),
                    files=[("images", ("same.png", photo)), ("images", ("same.png", photo))])
    assert r.status_code == 422 and "share the id 'same'" in r.json()["error"], r.text
    assert uploads_of(run) == []
    r = client.post("/api/items", headers=auth(), data={"ids": ["10001"]})
    assert r.status_code == 422 and "images" in r.json()["error"]
    r = client.post("/api/items", headers=auth(), files=files, data={"ids": ["10001"]})
    assert r.status_code == 422 and "one id per image" in r.json()["error"]
    assert uploads_of(run) == []
    # any failure, not only the library's errors
    monkeypatch.setattr(client.app.state.watcher.rec, "add", lambda *a, **k: 1 / 0)
    r = TestClient(client.app, raise_server_exceptions=False).post(
        "/api/items", headers=auth(), files=files, data={"ids": ["10001", "10002"]})
    assert r.status_code == 500 and uploads_of(run) == []
    assert client.get("/api/stats").json()["items"] == 24


def test_a_write_that_meets_a_newer_model_version_is_a_conflict(served, monkeypatch):
    from fashionrec.rundir import StaleVersion

    client, run = served

    def stale(*args, **kwargs):
        raise StaleVersion(f"{run} was retrained meanwhile; nothing was changed")
    monkeypatch.setattr(client.app.state.watcher.rec, "remove", stale)
    r = client.delete("/api/items/3", headers=auth())
    assert r.status_code == 409 and "retrained meanwhile" in r.json()["error"]
    monkeypatch.setattr(client.app.state.watcher.rec, "add", stale)
    r = client.post("/api/items", headers=auth(),
                    files=[("images", ("a.png", png_bytes(np.zeros((28, 28)))))],
                    data={"ids": ["10001"]})
    assert r.status_code == 409 and uploads_of(run) == []


def test_changes_by_another_process_are_picked_up(served):
    client, run = served
    other = Recommender.load(run)  # e.g. the CLI
    other.remove([5], log=None)
    deadline = time.monotonic() + 10
    while client.get("/api/stats").json()["items"] != 23:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get("/api/items/5").status_code == 404


def test_queries_never_break_while_products_come_and_go(served):
    """Threads query by item and by photo while another thread adds and removes
    products through the API: no error, and the final count is right."""
    client, run = served
    rec = Recommender.load(run)
    photo = png_bytes(rec.query_image(30)[0])
    errors, stop = [], threading.Event()

    def query(n):
        for i in range(n):
            if stop.is_set():
                return
            r = (client.get(f"/api/items/{i % 24}/similar", params={"k": 3}) if i % 3 else
                 client.post("/api/similar", files={"image": ("q.png", photo)},
                             data={"k": "3"}))
            if r.status_code != 200 or len(r.json()["items"]) != 3:
                errors.append((r.status_code, r.text))

    readers = [threading.Thread(target=query, args=(40,)) for _ in range(4)]
    for t in readers:
        t.start()
    for j in range(6):
        r = client.post("/api/items", headers=auth(),
                        files=[("images", ("n.png", photo))], data={"ids": [str(20000 + j)]})
        assert r.status_code == 200, r.text
        if j % 2:
            assert client.delete(f"/api/items/{20000 + j}", headers=auth()).status_code == 200
    for t in readers:
        t.join(timeout=300)
    stop.set()
    assert errors == []
    assert client.get("/api/stats").json()["items"] == 24 + 3


def test_health_and_queries_answer_while_a_reload_runs(served, monkeypatch):
    """A reload (here held for seconds) runs in the watching thread, never on the event
    loop: health answers at once, and a photo query is answered by the model it has."""
    client, run = served
    rec = client.app.state.watcher.rec
    gate, started, real = threading.Event(), threading.Event(), type(rec).refresh

    def slow(self, log=None):
        started.set()
        gate.wait(15)
        return real(self, log)
    monkeypatch.setattr(type(rec), "refresh", slow)
    other = Recommender.load(run)  # another process changes the catalog: a reload is due
    other.remove([int(other.index_.ids[0])], log=None)
    photo = png_bytes(other.query_image(30)[0])
    try:
        assert started.wait(15), "no reload started"
        t = time.monotonic()
        assert client.get("/api/health").status_code == 200
        r = client.post("/api/similar", files={"image": ("q.png", photo)}, data={"k": "1"})
        assert r.status_code == 200 and client.get("/api/items?limit=1").status_code == 200
        assert time.monotonic() - t < 5.0  # none of them waited for the reload
    finally:
        gate.set()


def test_the_batcher_shares_one_call_between_requests_that_arrive_together():
    calls = []

    def run(requests):
        calls.append(len(requests))
        time.sleep(0.05)
        return [r * 10 if r != 3 else ValueError("bad") for r in requests]

    b = MicroBatcher(run, max_batch=4, max_wait_s=0.02)
    futures = [b.submit(i) for i in range(10)]
    results = []
    for f in futures:
        try:
            results.append(f.result(timeout=10))
        except ValueError:
            results.append("error")
    b.close()
    assert results == [0, 10, 20, "error", 40, 50, 60, 70, 80, 90]  # in order, per request
    assert sum(calls) == 10 and max(calls) == 4 and len(calls) <= 4


def test_a_run_copied_without_its_backbone_still_serves_items(tiny_config, tmp_path):
    """A run whose backbone file and training data are gone (copied elsewhere) loads,
    answers item queries (library, CLI and HTTP) and says photo queries are off. (A
    Keras-engine run: an OpenVINO one keeps its backbone as IR in the run, see
    test_lean.py.)"""
    import re

    from models import tiny_backbone

    from fashionrec.cli import main

    (tmp_path / "bb").mkdir()
    backbone = tiny_backbone(tmp_path / "bb" / "tiny.keras")
    rec = Recommender(tiny_config, backbone=str(backbone), weights="imagenet",
                      engine="keras").fit(progress=False, log=None)
    rec.save(tmp_path / "run")
    shutil.rmtree(tmp_path / "bb")
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "run", moved)
    assert [i.id for i in Recommender.load(moved).recommend(item=3, k=3).items] == [
        i.id for i in rec.recommend(item=3, k=3).items]
    assert main(["recommend", "--run-dir", str(moved), "--item", "3", "--json"]) == 0
    with TestClient(create_app(ServeSettings(str(moved)))) as client:
        deadline = time.monotonic() + 60
        while client.get("/api/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.get("/api/items/3/similar?k=3").status_code == 200
        r = client.post("/api/similar", files={"image": ("q.png", png_bytes(np.zeros((28, 28))))})
        error = r.json()["error"]
        assert r.status_code == 503 and "backbone cannot be loaded" in error, error
        assert "backbone file" in client.app.state.watcher.photo_error  # the log's reason
        assert str(tmp_path) not in r.text and not re.search(r"(^|[\s(\"'])/\w", error), error


def test_a_retrain_in_place_is_swapped_in_once_complete(served, tiny_config):
    client, run = served
    old_id = client.get("/api/stats").json()["run"]["run_id"]
    new = Recommender(tiny_config, seed=7, n_reco=20).fit(progress=False, log=None)
    new.save(run)  # the same folder, while serving
    deadline = time.monotonic() + 60
    while (stats := client.get("/api/stats").json())["run"]["run_id"] == old_id:
        assert time.monotonic() < deadline, "the new run was never picked up"
        time.sleep(0.1)
    # the items the library serves from the new version (publish carries over products
    # of the previous catalog that the new training did not index)
    assert stats["run"]["run_id"] == new.run_id_
    assert stats == Recommender.load(run).stats()
    assert client.get("/api/items/3/similar?k=3").status_code == 200


def test_a_product_catalog_is_served_with_path_like_ids(tmp_path):
    """String ids with slashes (folder catalogs) work in every item route, and a new
    photo is answered within a category."""
    from urllib.parse import quote

    from catalogs import CLASSES, draw_product, make_folder_catalog

    from fashionrec.catalog import Catalog

    root = tmp_path / "shop"
    make_folder_catalog(root)
    rec = Recommender(image_size=32, weights="none", epochs=2, batch_size=8,
                      extract_batch_size=16).fit_catalog(
        Catalog.from_folder(root, label_depth=2), progress=False, log=None)
    rec.save(tmp_path / "run")
    boot = "Shoes/Boots/brand1/001.png"
    with TestClient(create_app(ServeSettings(str(tmp_path / "run")))) as client:
        deadline = time.monotonic() + 60
        while client.get("/api/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        got = client.get(f"/api/items/{quote(boot, safe='')}/similar",
                         params={"k": 3, "category": "Shoes"}).json()
        expected = rec.recommend(item=boot, k=3, category="Shoes")
        assert [i["id"] for i in got["items"]] == [i.id for i in expected.items]
        assert got["items"][0]["image_url"].startswith("/api/items/Shoes%2F")
        picture = client.get(got["items"][0]["image_url"])
        assert picture.status_code == 200
        assert Image.open(io.BytesIO(picture.content)).size == (160, 160)
        assert client.get(f"/api/items/{quote(boot, safe='')}").json()["category"] == \
            "Shoes/Boots/brand1"
        assert client.get("/api/items", params={"category": "Bags"}).json()["total"] == 8
        for url in [f"/api/items/{quote(boot, safe='')}", "/api/items?category=Shoes",
                    f"/api/items/{quote(boot, safe='')}/similar?k=3", "/api/stats"]:
            r = client.get(url)  # the items' pictures lie in tmp_path/shop: never shown
            assert r.status_code == 200 and str(tmp_path) not in r.text, r.text
            assert "/tmp" not in r.text and '"path"' not in r.text, r.text
        shape, colour = CLASSES["Shoes/Sandals"]
        photo = draw_product(shape, colour, np.random.default_rng(3), (70, 50))
        buf = io.BytesIO()
        photo.save(buf, "PNG")
        r = client.post("/api/similar", files={"image": ("s.png", buf.getvalue())},
                        data={"k": "3", "category": "Shoes"}).json()
        assert len(r["items"]) == 3 and all(i["category"].startswith("Shoes/")
                                            for i in r["items"])
