"""A catalog that grows one product at a time stays loadable and fast: a load keeps
one file open however many segments there are, and a write that leaves too many
segments (or too many removed items) folds them, in the write's own process for the
library and the CLI, in a background thread for the service."""

import io
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from fashionrec import CatalogIndex, Recommender, RunDir
from fashionrec.catalog import Catalog
from fashionrec.store import IndexStore

CLASSES = ["boots", "bags", "hats"]


def base_index(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return CatalogIndex(rng.normal(size=(n, 8)).astype(np.float32),
                        ids=[f"sku-{i}" for i in range(n)], labels=np.arange(n) % 3,
                        class_names=CLASSES, metadata={"run_id": "run-1"})


def one(item_id, seed):
    rng = np.random.default_rng(seed)
    return CatalogIndex(rng.normal(size=(1, 8)).astype(np.float32), [item_id], [0], CLASSES)


@pytest.fixture
def grown(tmp_path):
    """An index with 80 single-item segments (80 API adds)."""
    store = IndexStore(tmp_path / "index.h5")
    store.write_base(base_index())
    for i in range(80):
        store.add(one(f"new-{i}", i))
    return store


def open_files():
    return len(os.listdir("/proc/self/fd"))


def test_a_load_holds_one_file_open_however_many_segments(grown):
    before = open_files()
    live = grown.load()
    assert len(live) == 140 and live.row_of("new-79") is not None
    assert open_files() - before <= 1  # the base's memory map; segments are read whole
    del live


def test_a_load_works_under_a_low_open_file_limit(grown):
    """What failed at ~1,000 segments under ``ulimit -n 1024``, at 80 under 40."""
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        from fashionrec.store import IndexStore
        print(len(IndexStore({str(grown.path)!r}).load()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["140"], out.stderr[-2000:]


def test_pending_counts_what_a_compaction_folds(grown):
    assert grown.pending() == {"segments": 80, "removed": 0}
    grown.remove(["sku-1", "new-3"])
    assert grown.pending() == {"segments": 80, "removed": 2}
    grown.compact()
    assert grown.pending() == {"segments": 0, "removed": 0}
    assert len(grown.load()) == 138


def png_file(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[1], run)
    return run


def test_library_writes_compact_past_the_segment_rule(run_copy, tmp_path):
    rec = Recommender.load(run_copy)
    rec.compact_segments, lines = 3, []
    image = rec.query_image(30)[0]
    for i in range(3):
        rec.add(Catalog.from_files([png_file(tmp_path / f"p{i}.png", image)],
                                   ids=[str(20000 + i)]), progress=False, log=lines.append)
        assert rec.index_.metadata["n_updates"] == (0 if i == 2 else i + 1)
    assert any("3 added segments" in line for line in lines), lines
    again = Recommender.load(run_copy)
    assert len(again.index_) == 27 and again.index_.row_of(20002) is not None


def test_library_removes_compact_past_the_removed_share(run_copy):
    rec = Recommender.load(run_copy)
    rec.compact_removed_share = 0.1  # 3 of 24 items is 12.5 %
    rec.remove([int(i) for i in rec.index_.ids[:2]], log=None)
    assert rec.compaction_due() is None and rec.index_.metadata["n_updates"] == 1
    rec.remove([int(rec.index_.ids[0])], log=None)
    assert rec.index_.metadata["n_updates"] == 0 and len(rec.index_) == 21
    assert rec.compaction_due() is None


def test_auto_compaction_can_be_turned_off(run_copy, tmp_path):
    rec = Recommender.load(run_copy)
    rec.compact_segments, rec.auto_compact = 1, False
    rec.add(Catalog.from_files([png_file(tmp_path / "p.png", rec.query_image(30)[0])],
                               ids=["20000"]), progress=False, log=None)
    assert rec.index_.metadata["n_updates"] == 1 and "1 added segments" in rec.compaction_due()


def test_a_busy_catalog_postpones_the_compaction_not_the_add(run_copy, tmp_path):
    from fashionrec.errors import FashionrecError

    rec = Recommender.load(run_copy)
    rec.compact_segments, lines = 1, []

    def busy(*args, **kwargs):
        raise FashionrecError("the index is being updated by another process")
    rec.compact = busy
    report = rec.add(Catalog.from_files([png_file(tmp_path / "p.png", rec.query_image(30)[0])],
                                        ids=["20000"]), progress=False, log=lines.append)
    assert report["n_added"] == 1 and rec.index_.row_of(20000) is not None
    assert any("compact: not now" in line for line in lines), lines
    assert Recommender.load(run_copy).index_.metadata["n_updates"] == 1


pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_service_compacts_in_the_background_and_loses_nothing(trained_run, tmp_path):
    from serving import serve_copy

    served = serve_copy(trained_run[1], tmp_path / "run", "k", compact_segments=4)
    client, run = next(served)
    try:
        photo = png_bytes(Recommender.load(run).query_image(30)[0])
        auth = {"Authorization": "Bearer k"}
        for i in range(10):
            r = client.post("/api/items", headers=auth, files=[("images", ("p.png", photo))],
                            data={"ids": [str(20000 + i)]})
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while IndexStore.of(RunDir(run).current()).pending()["segments"] >= 4:
            assert time.monotonic() < deadline, "no compaction happened"
            time.sleep(0.1)
        for i in range(10):  # every acknowledged add is served and on disk
            assert client.get(f"/api/items/{20000 + i}").status_code == 200
        assert len(Recommender.load(run).index_) == 34
        assert client.get("/api/stats").json()["items"] == 34
    finally:
        served.close()


def test_an_add_saved_but_not_read_back_keeps_its_picture(trained_run, tmp_path,
                                                          monkeypatch):
    """The add is durable once the store has it: a failing read-back afterwards is no
    reason to delete the uploaded picture (or to answer an error)."""
    from serving import serve_copy

    from fashionrec.errors import FashionrecError

    served = serve_copy(trained_run[1], tmp_path / "run", "k")
    client, run = next(served)
    try:
        rec = client.app.state.watcher.rec
        photo = png_bytes(rec.query_image(30)[0])
        real, calls = type(rec).refresh, []

        def failing(self, log=None):
            calls.append(1)
            if len(calls) == 1:
                raise FashionrecError("Too many open files")
            return real(self, log)
        monkeypatch.setattr(type(rec), "refresh", failing)
        r = client.post("/api/items", headers={"Authorization": "Bearer k"},
                        files=[("images", ("p.png", photo))], data={"ids": ["20000"]})
        assert r.status_code == 200 and r.json()["n_added"] == 1, r.text
        assert len(list((run / "uploads").iterdir())) == 1
        deadline = time.monotonic() + 30
        while client.get("/api/items/20000").status_code != 200:  # the next look reads it
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert Recommender.load(run).item(20000).path is not None
    finally:
        served.close()
