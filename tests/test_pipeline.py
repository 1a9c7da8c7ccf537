"""The extraction pipeline: background decoding in order and bounded, one decode per
image for every view, unreadable files reported (not fatal), resumable caches, and a
catalog run that answers photo queries with the engine it was made with."""

import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
from catalogs import make_folder_catalog
from conftest import TINY_MODEL

from fashionrec import FashionrecError, Recommender
from fashionrec import images as images_module
from fashionrec.catalog import Catalog, ImageFiles
from fashionrec.extract import FeatureExtractor, ViewCache, build_backbone, prefetch

# extract_batch_size 8: the small shop extracts in several batches, which is what the
# decoding pipeline and its cache are tested on; the Keras engine in float32 so that
# every machine extracts alike ("auto" picks OpenVINO bfloat16 on some CPUs).
TINY = {**TINY_MODEL, "extract_batch_size": 8, "engine": "keras", "precision": "float32"}
VIEWS = [("pad", False), ("crop", False), ("pad", True), ("crop", True)]


# ----------------------------------------------------------------- prefetch
def test_prefetch_keeps_order_and_stays_bounded():
    running, most, lock = [0], [0], threading.Lock()
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, 40)

    def job(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(delays[i])
        with lock:
            running[0] -= 1
        return i

    started = []

    def jobs():
        for i in range(40):
            started.append(i)
            yield lambda i=i: job(i)

    got = []
    for value in prefetch(jobs(), workers=3, depth=4):
        got.append(value)
        assert len(started) - len(got) <= 4  # never more than `depth` ahead
    assert got == list(range(40))
    assert 1 < most[0] <= 3  # ran in parallel, within the workers


def test_prefetch_raises_at_the_failing_jobs_turn_and_stops_early():
    done = []

    def job(i):
        if i == 3:
            raise ValueError("bad job")
        done.append(i)
        return i

    got = []
    with pytest.raises(ValueError, match="bad job"):
        for value in prefetch((lambda i=i: job(i) for i in range(100)), workers=2, depth=4):
            got.append(value)
    assert got == [0, 1, 2]
    assert len(done) < 20  # the rest were not run


# ----------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe") / "folder"
    good, bad = make_folder_catalog(root, n_per_class=6)
    return root, good, bad


def test_each_image_is_decoded_once_for_all_views(shop, monkeypatch):
    root, good, _ = shop
    paths = [root / g for g in good[:7]]
    calls, fits = [], []
    real, real_fit = images_module.open_image, images_module.fit_square
    monkeypatch.setattr(images_module, "open_image",
                        lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    monkeypatch.setattr(images_module, "fit_square",
                        lambda img, size, fit: fits.append(fit) or real_fit(img, size, fit))
    files = ImageFiles(paths, 32, views=VIEWS)
    images, failed = files.load(0, len(files))
    assert images.shape == (7, 4, 32, 32, 3) and not failed
    assert len(calls) == 7
    assert sorted(fits) == ["crop"] * 7 + ["pad"] * 7  # a mirror view is not resized again
    monkeypatch.undo()
    for v, (fit, mirror) in enumerate(VIEWS):  # each view as reading it alone gives
        alone = ImageFiles(paths, 32, fit, mirror)[0:7]
        np.testing.assert_array_equal(images[:, v], alone)


def test_unreadable_files_are_reported_with_their_rows_not_fatal(shop):
    root, good, bad = shop
    broken = [root / b for b, kind in bad.items() if kind == "unreadable image"]
    paths = [root / good[0], broken[0], root / good[1], broken[1]]
    model, info = build_backbone(weights="none", image_size=32, seed=3, log=None,
                                 engine="keras")
    ext = FeatureExtractor(model, info, batch_size=2, workers=2)
    got, failed = {}, {}
    for start, feats, bad_rows in ext.iter_batches(ImageFiles(paths, 32, views=VIEWS[:2])):
        failed.update(bad_rows)
        for i, f in enumerate(feats):
            got[start + i] = f
    assert sorted(failed) == [1, 3]
    assert all(str(p) in failed[r] for r, p in ((1, broken[0]), (3, broken[1])))
    alone = ext.transform(ImageFiles([root / good[0], root / good[1]], 32, views=VIEWS[:2]))
    np.testing.assert_allclose(np.stack([got[0], got[2]]), alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(FashionrecError, match="cannot read image"):
        ext.transform(ImageFiles(paths, 32))  # the strict path says which file


def test_training_decodes_in_the_pipeline_and_reports_truncated_files(shop, tmp_path):
    root, good, bad = shop
    # a JPEG cut after its header: only decoding it (in the pipeline) finds out
    jpg = (root / good[0]).read_bytes()
    cut = root / "Shoes/Boots/brand0/cut-late.jpg"
    cut.write_bytes(jpg[: int(len(jpg) * 0.9)])
    bad = {**bad, "Shoes/Boots/brand0/cut-late.jpg": "unreadable image"}
    listed, _ = Catalog.from_files([cut]).check(progress=False, decode=False)
    assert len(listed) == 1  # the header check lets it through
    catalog = Catalog.from_folder(root, label_depth=2)
    rec = Recommender(**TINY).fit_catalog(catalog, min_class_size=5,
                                          cache_dir=tmp_path / "f", progress=False, log=None)
    skipped = {s["id"]: s["kind"] for s in rec.report_["skipped"]}
    for name, kind in bad.items():
        if kind == "unreadable image":
            assert skipped.get(name) == kind, name
    assert sorted(rec.index_.ids) == sorted(good)
    assert rec.report_["n_ok"] == len(good)
    # retraining hits the cache (made for the listed files, failures recorded in it)
    again = Recommender(**TINY).fit_catalog(catalog, min_class_size=5,
                                            cache_dir=tmp_path / "f", progress=False,
                                            log=None)
    assert sorted(again.index_.ids) == sorted(good)
    assert again.metadata_["timings"]["extract_s"] < rec.metadata_["timings"]["extract_s"]


# ----------------------------------------------------------------- resume
class Crash(Exception):
    pass


class CrashingRunner:
    """Computes like the extractor but dies after ``limit`` batches (a killed run)."""

    def __init__(self, ext, limit):
        self.ext, self.limit, self.rows = ext, limit, 0

    def iter_batches(self, images, progress, desc, skip):
        for n, (start, feats, failed) in enumerate(
                self.ext.iter_batches(images, progress, desc, skip)):
            if n == self.limit:
                raise Crash()
            self.rows += len(feats)
            yield start, feats, failed


def test_a_killed_extraction_resumes_where_it_stopped(shop, tmp_path):
    root, good, _ = shop
    paths = [root / g for g in good]
    model, info = build_backbone(weights="none", image_size=32, seed=3, log=None,
                                 engine="keras")
    ext = FeatureExtractor(model, info, batch_size=4)
    names, keys = ["catalog", "catalog-crop"], ["k0", "k1"]
    files = ImageFiles(paths, 32, views=VIEWS[:2])
    cache = ViewCache(tmp_path, info, names, keys, len(paths))
    with pytest.raises(Crash):
        cache.extract(None, files, False, views=VIEWS[:2], runner=CrashingRunner(ext, 2))
    partial = cache.partial_path([0, 1])
    with h5py.File(partial) as f:
        assert f["done"][:].sum() == 4  # two batches of two products (four views each)
    assert not any(p.is_file() for p in cache.paths)
    rest = CrashingRunner(ext, 10**6)
    views, failed = cache.extract(None, files, False, views=VIEWS[:2], runner=rest)
    assert rest.rows == len(paths) - 4 and not failed
    assert not partial.exists() and all(p.is_file() for p in cache.paths)
    whole = ext.transform(files)
    for v in range(2):
        np.testing.assert_allclose(views[v], whole[:, v], rtol=1e-5, atol=1e-5)


def test_a_partial_file_for_other_images_is_not_resumed(shop, tmp_path):
    root, good, _ = shop
    paths = [root / g for g in good]
    model, info = build_backbone(weights="none", image_size=32, seed=3, log=None,
                                 engine="keras")
    ext = FeatureExtractor(model, info, batch_size=4)
    files = ImageFiles(paths, 32)
    with pytest.raises(Crash):
        ViewCache(tmp_path, info, ["x"], ["old"], len(paths)).extract(
            None, files, False, runner=CrashingRunner(ext, 1))
    fresh = CrashingRunner(ext, 10**6)
    ViewCache(tmp_path, info, ["x"], ["new"], len(paths)).extract(None, files, False,
                                                                    runner=fresh)
    assert fresh.rows == len(paths)  # everything computed again


# ----------------------------------------------------------------- engine of a run
def test_a_saved_run_answers_photo_queries_with_its_engine(shop, tmp_path):
    pytest.importorskip("openvino")
    root, good, _ = shop
    catalog = Catalog.from_folder(root, label_depth=2)
    cfg = {**TINY, "engine": "openvino", "precision": "float32"}
    rec = Recommender(**cfg).fit_catalog(catalog, min_class_size=5, progress=False, log=None)
    rec.save(tmp_path / "run")
    assert rec.metadata_["backbone"]["engine"] == "openvino"
    code = textwrap.dedent(f"""
        from fashionrec import Recommender
        rec = Recommender.load({str(tmp_path / "run")!r})
        out = rec.recommend({str(root / good[0])!r}, k=1)
        print(rec.extractor.engine.name, rec.extractor.info.precision,
              out.items[0].id, round(out.items[0].distance, 5))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    engine, precision, item, distance = res.stdout.split()[-4:]
    assert (engine, precision, item) == ("openvino", "float32", good[0])
    assert float(distance) < 1e-3
