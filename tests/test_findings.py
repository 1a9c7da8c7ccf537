"""The service-hardening findings as a stranger meets them: over HTTP, on the command
line, through APIs that already existed when they were found (220889b), so that each
test here also runs there and fails for the finding's own reason
(``experiments/findings.py`` runs them on both)."""

import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.preprocessing import StandardScaler

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from serving import serve_copy  # noqa: E402

KEY = "findings-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    yield from serve_copy(trained_run[1], tmp_path_factory.mktemp("findings") / "run", KEY)


def eps_bytes():
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def test_1_an_eps_upload_is_refused_without_running_ghostscript(served):
    client, _ = served
    r = client.post("/api/similar", files={"image": ("q.eps", eps_bytes())})
    assert r.status_code == 400, r.text
    assert "Ghostscript" not in r.text and "JPEG, PNG or WebP" in r.json()["error"]


def test_2_a_small_16_bit_png_of_88_megapixels_is_413_from_its_header(served):
    client, _ = served
    buf = io.BytesIO()
    Image.new("I;16", (9400, 9400)).save(buf, "PNG")  # ~170 KB on the wire
    assert len(buf.getvalue()) < 1_000_000
    r = client.post("/api/similar", files={"image": ("big.png", buf.getvalue())})
    assert r.status_code == 413 and "more than the limit" in r.json()["error"], r.text


def test_3_a_cancelled_photo_query_does_not_kill_the_batcher():
    from fashionrec.serve.batcher import MicroBatcher

    gate = threading.Event()

    def run_batch(requests):
        gate.wait(5)
        return [r * 2 for r in requests]
    batcher = MicroBatcher(run_batch, max_batch=1, max_wait_s=0.0)
    try:
        first = batcher.submit(1)
        time.sleep(0.2)  # the worker holds it in a batch call
        first.cancel()  # its client left
        gate.set()
        assert batcher.submit(21).result(timeout=5) == 42  # the worker still answers
    finally:
        gate.set()
        batcher.close()


def test_4_health_answers_while_the_service_reloads_a_changed_catalog(served, monkeypatch):
    """Another process changes the catalog and reading it takes seconds: the reload
    must not run on the event loop (a photo query used to start it there)."""
    from fashionrec import Recommender
    from fashionrec.store import IndexStore

    client, run = served
    real = IndexStore.load

    def slow(self, *args, **kwargs):
        time.sleep(3)
        return real(self, *args, **kwargs)
    other = Recommender.load(run)
    other.remove([int(other.index_.ids[-1])], log=None)  # the change to pick up
    monkeypatch.setattr(IndexStore, "load", slow)
    photo = io.BytesIO()
    Image.fromarray(np.full((28, 28), 90, np.uint8)).save(photo, "PNG")
    query = threading.Thread(target=lambda: client.post(
        "/api/similar", files={"image": ("q.png", photo.getvalue())}, data={"k": "1"}))
    query.start()
    time.sleep(0.5)
    t = time.monotonic()
    assert client.get("/api/health").status_code == 200
    waited = time.monotonic() - t
    query.join(30)
    assert waited < 1.0, f"/api/health waited {waited:.1f} s for a reload"


def index_with(n, seed):
    from fashionrec import CatalogIndex

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 512)).astype(np.float32)  # stored contiguously: mappable
    return CatalogIndex(x, [f"sku-{seed}-{i}" for i in range(n)], np.zeros(n, int),
                        ["boots"], StandardScaler().fit(x), metadata={"run_id": "run-1"})


def test_5_a_load_of_many_segments_works_under_a_low_open_file_limit(tmp_path):
    """Each API add is a segment; a load that held a file per segment failed with "Too
    many open files" at ~1,000 of them under ``ulimit -n 1024`` (here: 80 under 40)."""
    import textwrap

    from fashionrec.store import IndexStore

    store = IndexStore(tmp_path / "index.h5")
    store.write_base(index_with(20, 0))
    for seed in range(1, 81):
        store.add(index_with(1, seed))
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        from fashionrec.store import IndexStore
        print(len(IndexStore({str(store.path)!r}).load()))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["100"], out.stderr[-2000:]


def test_11_a_file_renamed_over_the_index_mid_load_is_not_mixed_in(tmp_path, monkeypatch):
    """A compaction renames a new base over ``index.h5`` while a reader is between its
    header and its vectors: the reader keeps the vectors of the file it opened."""
    import fashionrec.index as index_module
    from fashionrec import CatalogIndex

    old, new = index_with(30, 1), index_with(30, 2)
    old.paths = new.paths = np.array([f"/shop/{i}.jpg" for i in range(30)], dtype=object)
    path = tmp_path / "index.h5"
    old.save(path)
    new.save(tmp_path / "new.h5")
    real, swapped = index_module._as_strings, []

    def swap_then_read(*args):  # paths are read before the vectors are mapped
        if not swapped:
            swapped.append((tmp_path / "new.h5").replace(path))
        return real(*args)
    monkeypatch.setattr(index_module, "_as_strings", swap_then_read)
    loaded = CatalogIndex.load(path)
    assert swapped and np.array_equal(np.asarray(loaded.vectors), np.asarray(old.vectors))
    assert np.array_equal(loaded.ids, old.ids)


def test_8_the_image_route_decodes_a_picture_once(tmp_path, monkeypatch):
    """A product catalog's pictures are files: the route keeps the encoded display
    picture instead of decoding the original on every request."""
    from urllib.parse import quote

    from catalogs import make_folder_catalog
    from fastapi.testclient import TestClient

    from fashionrec import Recommender
    from fashionrec.catalog import Catalog
    from fashionrec.serve import ServeSettings, create_app

    make_folder_catalog(tmp_path / "shop")
    rec = Recommender(image_size=32, weights="none", epochs=1, batch_size=8,
                      extract_batch_size=16).fit_catalog(
        Catalog.from_folder(tmp_path / "shop", label_depth=2), progress=False, log=None)
    rec.save(tmp_path / "run")
    url = f"/api/items/{quote('Shoes/Boots/brand1/001.png', safe='')}/image"
    with TestClient(create_app(ServeSettings(str(tmp_path / "run")))) as client:
        deadline = time.monotonic() + 60
        while client.get("/api/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.get(url).status_code == 200
        opened, real = [], Image.open
        monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real(*a, **k))
        assert client.get(url).status_code == 200
    assert opened == []  # served from the display cache, not decoded again


def cli(*argv, cwd):
    """``fashionrec`` in a fresh process (``cwd`` outside the source tree, so the
    package on ``PYTHONPATH`` or installed is the one run)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "fashionrec", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_9_train_refuses_a_folder_that_is_not_a_run(tmp_path, fmnist_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "split.json").write_text("my own file")
    (mine / "run.json").write_text('{"mine": true}')
    out = cli("train", "--run-dir", str(mine), "--data-dir", str(fmnist_dir), "--n-train",
              "48", "--n-reco", "24", "--image-size", "32", "--weights", "none", "--epochs",
              "1", "--no-progress", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (mine / "split.json").read_text() == "my own file"
    assert (mine / "run.json").read_text() == '{"mine": true}'


def test_10_train_on_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    out = cli("train", "--catalog", str(tmp_path / "empty"), "--run-dir",
              str(tmp_path / "run"), "--image-size", "32", "--weights", "none",
              "--no-progress", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
