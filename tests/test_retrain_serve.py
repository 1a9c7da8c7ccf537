"""A served run retrained in place while products are added over HTTP: no add answered
200 is lost, none is answered 5xx, and the service moves to the new version.

Only the service's HTTP routes are used (its modules are being reorganised).
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serving import paced, serve_copy  # noqa: E402

from fashionrec import Recommender  # noqa: E402
from fashionrec.artifacts import read_json  # noqa: E402
from fashionrec.serve import ServeSettings, create_app  # noqa: E402

KEY = "retrain-key"
FAST = dict(engine="keras", precision="float32")  # the quickest backbone to build


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def served_run_id(client):
    stats = client.get("/api/stats").json()
    return (stats.get("run") or {}).get("run_id", stats.get("run_id"))


@pytest.fixture
def served(trained_run, tmp_path):
    """A private copy of the tiny Fashion-MNIST run, served with writes on."""
    yield from serve_copy(trained_run[1], tmp_path / "run", KEY)


def test_adds_over_http_while_the_run_is_retrained_in_place(served, tiny_config):
    client, run = served
    old_id = served_run_id(client)
    reader = Recommender.load(run, log=None)  # only for the test images (no backbone)
    photos = {20000 + i: png_bytes(reader.query_image(i)[0]) for i in range(30, 90)}
    queue = sorted(photos)
    saving, done, answers = threading.Event(), threading.Event(), []

    def add_one_by_one():
        for item_id in paced(queue, saving, done):
            r = client.post("/api/items", headers=auth(),
                            files=[("images", (f"{item_id}.png", photos[item_id]))],
                            data={"ids": [str(item_id)]})
            answers.append((item_id, r.status_code, r.text))

    thread = threading.Thread(target=add_one_by_one)
    thread.start()
    try:
        new = Recommender(tiny_config, seed=7, **FAST).fit(
            cache_dir=run / "features", progress=False, log=None)
        saving.set()
        new.save(run, log=None)  # the served folder, while adds arrive
    finally:
        saving.set()
        done.set()
        thread.join(timeout=300)
    assert not thread.is_alive()
    new_id = read_json(run / "run.json")["run_id"]
    assert new_id == new.run_id_ != old_id

    t0 = time.monotonic()
    while served_run_id(client) != new_id:
        assert time.monotonic() - t0 < 20, "the service never switched to the new version"
        time.sleep(0.1)

    failed = [(i, status, text) for i, status, text in answers if status >= 500]
    assert failed == [], failed
    ok = [i for i, status, _ in answers if status == 200]
    assert len(ok) >= 3, answers
    published = Recommender.load(run, log=None)
    assert published.run_id_ == new_id
    assert [i for i in ok if published.index_.row_of(i) is None] == []
    for item_id in ok:
        r = client.get(f"/api/items/{item_id}")
        assert r.status_code == 200 and r.json()["id"] == item_id, (item_id, r.text)
        found = client.post("/api/similar", files={"image": ("q.png", photos[item_id])},
                            data={"k": "1"})
        assert found.status_code == 200, found.text
        assert found.json()["items"][0]["id"] == item_id, (item_id, found.json())


def test_a_served_catalog_run_retrained_in_place_keeps_its_api_adds(tmp_path):
    """The same for a product catalog (folder): products added over HTTP are in the
    published new version, re-embedded, and a photo query with one finds it first."""
    from catalogs import CLASSES, draw_product

    from fashionrec.catalog import Catalog

    root, run = tmp_path / "catalog", tmp_path / "run"
    rng = np.random.default_rng(0)
    for cls, (shape, colour) in CLASSES.items():
        for k in range(6):
            path = root / cls.split("/")[1] / f"{k:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_product(shape, colour, rng, (64 + 7 * k, 60), "RGB").save(path)
    shop = dict(image_size=32, weights="none", epochs=2, batch_size=16,
                extract_batch_size=16, **FAST)

    def fit(seed):
        return Recommender(**shop, seed=seed).fit_catalog(
            Catalog.read(root), min_class_size=1, cache_dir=run / "features",
            progress=False, log=None)

    fit(1).save(run, log=None)
    photos = {}
    for i, cls in enumerate(list(CLASSES)[:2]):
        buf = io.BytesIO()
        draw_product(*CLASSES[cls], np.random.default_rng(50 + i), (80, 50), "RGB").save(
            buf, "PNG")
        photos[f"new-{i}"] = buf.getvalue()
    app = create_app(ServeSettings(str(run), api_key=KEY, check_interval=0.0))
    with TestClient(app) as client:
        while client.get("/api/ready").status_code != 200:
            time.sleep(0.1)
        for item_id, data in photos.items():
            r = client.post("/api/items", headers=auth(), data={"ids": [item_id]},
                            files=[("images", (f"{item_id}.png", data))])
            assert r.status_code == 200, r.text
        new = fit(2)
        new.save(run, log=None)
        t0 = time.monotonic()
        while served_run_id(client) != new.run_id_:
            assert time.monotonic() - t0 < 20, "the service never switched"
            time.sleep(0.1)
        for item_id, data in photos.items():
            found = client.post("/api/similar", files={"image": ("q.png", data)},
                                data={"k": "1"})
            assert found.status_code == 200, found.text
            top = found.json()["items"][0]
            assert top["id"] == item_id and top["distance"] < 1e-2, (item_id, top)
