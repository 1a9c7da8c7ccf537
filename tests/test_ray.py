"""Catalog feature extraction on Ray Data (fashionrec.distributed): the same features
as the plain path, unreadable files reported, worker errors as one line, a killed
`fashionrec extract --ray` resumed, and `fashionrec train` reusing what it extracted.

One local Ray serves the in-process tests (started once per module); the command-line
tests start their own, in their own process."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
from catalogs import make_folder_catalog
from models import tiny_backbone

from fashionrec import FashionrecError, Recommender
from fashionrec.catalog import Catalog, ImageFiles
from fashionrec.cli import main
from fashionrec.extract import FeatureExtractor, build_backbone

ray = pytest.importorskip("ray")

from fashionrec.distributed import RayExtractor  # noqa: E402

CUT = "Shoes/Boots/brand1/cut.jpg"  # passes the header check, fails decoding


def add_cut_jpeg(root):
    """A JPEG cut short after its header: only decoding finds it unreadable."""
    from PIL import Image

    from fashionrec.catalog import verify_image

    path = root / CUT
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    verify_image(path, decode=False)  # the header reads
    with pytest.raises(FashionrecError):
        verify_image(path)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the module; RayExtractor uses it and leaves it running."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1),
                 include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A tiny folder catalog (24 readable images, one cut JPEG that only decoding
    finds) and a tiny saved backbone; returns (catalog, backbone path)."""
    root = tmp_path_factory.mktemp("shop") / "folder"
    make_folder_catalog(root)
    add_cut_jpeg(root)
    backbone = tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny.keras")
    return Catalog.from_folder(root, label_depth=2), backbone


def config(backbone, engine="keras", **extra):
    return dict(image_size=32, backbone=str(backbone), engine=engine, precision="float32",
                extract_batch_size=16, **extra)


def cached(cache_dir):
    """``{file name: features}`` of a feature cache folder."""
    out = {}
    for path in sorted(cache_dir.glob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.name] = f["features"][:]
    return out


@pytest.mark.parametrize("engine, workers", [("keras", (1, 2)), ("openvino", (2,))])
def test_ray_gives_the_plain_paths_features(local_ray, shop, tmp_path, engine, workers):
    if engine == "openvino":
        pytest.importorskip("openvino")
    catalog, backbone = shop
    cfg = config(backbone, engine)
    plain = Recommender(**cfg).extract_catalog(catalog, cache_dir=tmp_path / "plain",
                                               progress=False, log=None)
    assert plain["n_items"] == 25 and len(plain["files"]) == 4  # pad+crop x flip
    assert list(plain["failed"]) == [CUT]
    expected = cached(tmp_path / "plain")
    for w in workers:
        runner = RayExtractor(workers=w)
        assert runner.describe() == f"local, {w} worker{'s' if w > 1 else ''}"
        out = Recommender(**cfg).extract_catalog(catalog, cache_dir=tmp_path / f"ray{w}",
                                                 progress=False, log=None, runner=runner)
        runner.close()
        assert ray.is_initialized()  # not ours to shut down
        assert out == plain  # same items, same unreadable one, same files
        got = cached(tmp_path / f"ray{w}")
        assert sorted(got) == sorted(expected)
        for name, feats in expected.items():
            assert np.abs(got[name] - feats).max() <= 1e-5, (w, name)
        assert runner.stats_["images"] == 25 and runner.stats_["chunks"] >= w
        assert not list((tmp_path / f"ray{w}").glob("*.partial.h5"))
    # everything cached: the runner has nothing to compute and starts no Ray
    idle = RayExtractor(workers=1)
    idle.connect = lambda: pytest.fail("connected to Ray although all was cached")
    assert Recommender(**cfg).extract_catalog(catalog, cache_dir=tmp_path / f"ray{w}",
                                              progress=False, log=None, runner=idle) == plain


def test_unreadable_files_are_reported_and_skipped_rows_not_computed(local_ray, shop,
                                                                     tmp_path):
    catalog, backbone = shop
    good = [p for p in catalog.paths if p.suffix == ".jpg" and p.name != "cut.jpg"]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    truncated = next(p for p in catalog.paths if p.name == "cut.jpg")
    paths = [good[0], truncated, good[1], text, good[2], good[3], good[4]]
    images = ImageFiles(paths, 32, views=[("pad", False), ("crop", True)])
    model, info = build_backbone(str(backbone), image_size=32, log=None, engine="keras",
                                 precision="float32")
    skip = np.zeros(len(paths), bool)
    skip[[4, 5]] = True  # done before: never computed
    runner = RayExtractor(workers=1, chunk_size=2).prepare(info, 4)
    got, failed = {}, {}
    for start, feats, bad in runner.iter_batches(images, progress=False, skip=skip):
        assert feats.shape[1:] == (2, info.feature_dim) and feats.dtype == np.float32
        got.update({start + i: f for i, f in enumerate(feats)})
        failed.update(bad)
    assert sorted(got) == [0, 1, 2, 3, 6]
    assert sorted(failed) == [1, 3]
    assert "cut.jpg" in failed[1] and "notes.jpg" in failed[3]
    assert all("\n" not in why for why in failed.values())
    plain = FeatureExtractor(model, info, 4).transform(ImageFiles(
        [paths[i] for i in (0, 2, 6)], 32, views=[("pad", False), ("crop", True)]))
    np.testing.assert_allclose(np.stack([got[0], got[2], got[6]]), plain, atol=1e-5)


def test_a_backbone_missing_on_a_worker_is_one_line(local_ray, shop, tmp_path):
    catalog, backbone = shop
    copy = shutil.copy(backbone, tmp_path / "moved.keras")
    _, info = build_backbone(str(copy), image_size=32, log=None, engine="keras",
                             precision="float32")
    runner = RayExtractor(workers=1).prepare(info, 16)
    os.remove(copy)  # gone before the workers rebuild it
    with pytest.raises(FashionrecError) as err:
        list(runner.iter_batches(catalog.images(32), progress=False))
    message = str(err.value)
    assert "moved.keras is gone" in message and "\n" not in message
    assert "Traceback" not in message and "RayTaskError" not in message


def test_without_ray_installed_is_one_line(monkeypatch, shop, tmp_path, capsys):
    catalog, _ = shop
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FashionrecError, match=r"pip install 'fashionrec\[ray\]'") as err:
        RayExtractor()
    assert "\n" not in str(err.value)
    root = catalog.source["root"]
    assert main(["extract", "--catalog", root, "--run-dir", str(tmp_path), "--ray",
                 "--no-progress"]) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ")
    assert "fashionrec[ray]" in err_lines[0]


def test_a_cluster_that_cannot_be_joined_is_one_line(monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionError("ray client connection timeout\nmore details")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    runner = RayExtractor("ray://head.invalid:10001")
    with pytest.raises(FashionrecError) as err:
        runner.describe()  # a cluster's default workers need its CPUs: connects
    assert str(err.value) == ("cannot join the Ray cluster at ray://head.invalid:10001 "
                              "(ray client connection timeout more details)")
    assert RayExtractor("ray://head.invalid:10001", workers=3).describe() == \
        "ray://head.invalid:10001, 3 workers"


def test_actor_resources_leave_cpus_free_and_fit_a_node():
    with pytest.raises(FashionrecError, match="workers must be"):
        RayExtractor(workers=0)
    runner = RayExtractor(workers=2)
    runner.connect = lambda: runner  # a pretend cluster: two nodes of 2 CPUs
    runner._cpus, runner._node_cpus = 4.0, 2.0
    assert runner.resources() == (1.5, 2)  # 3 of 4 CPUs shared, 1.5 fits a node
    runner.workers = 1
    assert runner.resources() == (1.5, 2)  # not 3: no node has that many
    runner.workers = 8
    assert runner.resources() == (0.375, 1)
    runner._cpus = runner._node_cpus = 2.0  # this machine: a quarter CPU per core free
    runner.workers = 2
    assert runner.resources() == (0.75, 1)


def test_chunks_lie_on_a_grid_of_whole_batches():
    runner = RayExtractor(workers=2, num_cpus=0.5)
    runner.batch_size = 16
    chunks = runner.chunks(40, per_item=4)  # 4 images per backbone call
    assert all(len(c) % 4 == 0 for c in chunks[:-1]) and np.concatenate(chunks).tolist() == \
        list(range(40))
    assert all(c[0] % len(chunks[0]) == 0 for c in chunks)  # on the grid of whole batches
    skip = np.zeros(40, bool)
    skip[5:30] = True
    chunks = runner.chunks(40, per_item=4, skip=skip)
    assert np.concatenate(chunks).tolist() == [0, 1, 2, 3, 4, *range(30, 40)]


# ---------------------------------------------------------------- the command line
SIZE = 64


def slow_backbone(path):
    """A saved backbone slow enough (two 5x5 convolutions of 64 filters at 64 px) for
    a run to be caught half-way."""
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(64, 5, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(64, 5, padding="same", activation="relu")(x)
    keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    return path


def cli_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("RAY_ADDRESS", None)
    return env


def done_rows(partial):
    """The ``done`` rows of a partial feature file another process writes (``None``
    while it cannot be read)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f["done"][:].sum()), len(f["done"])
    except (OSError, KeyError):
        return None


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """`fashionrec extract --ray` killed (SIGKILL, with its Ray) once some rows are in
    the partial file, then run again to the end."""
    base = tmp_path_factory.mktemp("cli")
    root = base / "folder"
    make_folder_catalog(root, n_per_class=14)  # 42 readable images
    add_cut_jpeg(root)
    backbone = slow_backbone(base / "slow.keras")
    run_dir = base / "run"
    options = ["--catalog", str(root), "--label-depth", "2", "--image-size", str(SIZE),
               "--backbone", str(backbone), "--engine", "keras", "--precision", "float32",
               "--extract-batch-size", "4"]
    extract = [sys.executable, "-m", "fashionrec", "extract", *options,
               "--run-dir", str(run_dir), "--ray", "--ray-workers", "1"]
    proc = subprocess.Popen(extract, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=cli_env(), start_new_session=True)
    features = run_dir / "features"
    seen, deadline = None, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            partials = list(features.glob("*.partial.h5")) if features.is_dir() else []
            seen = done_rows(partials[0]) if partials else None
            if seen and 0 < seen[0] < seen[1]:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and the Ray it started
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert seen and 0 < seen[0] < seen[1], f"not caught half-way ({seen}):\n{out[-3000:]}"
    partial = next(features.glob("*.partial.h5"))
    done, n = done_rows(partial)
    assert 0 < done < n
    again = subprocess.run(extract, capture_output=True, text=True, env=cli_env(),
                           timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    return dict(root=root, backbone=backbone, run_dir=run_dir, options=options,
                done=done, n=n, again=again)


def test_a_killed_ray_extraction_resumes(killed_and_resumed, tmp_path):
    r = killed_and_resumed
    done, n, again = r["done"], r["n"], r["again"]
    assert f"resuming, {done} of {n} images done" in again.stdout
    assert "on Ray (local, 1 worker)" in again.stdout
    # the progress bar counts only the rows computed in this run
    bars = [line for line in re.split(r"[\r\n]", again.stderr)
            if line.startswith("extract catalog")]
    totals = {int(m) for line in bars for m in re.findall(r"\| *\d+/(\d+) ", line)}
    assert totals == {n - done}, again.stderr[-2000:]
    assert "1 image(s), left out at training" in again.stdout  # the cut JPEG
    features = r["run_dir"] / "features"
    assert not list(features.glob("*.partial.h5"))
    plain = Recommender(image_size=SIZE, backbone=str(r["backbone"]), engine="keras",
                        precision="float32", extract_batch_size=4).extract_catalog(
        Catalog.from_folder(r["root"], label_depth=2), cache_dir=tmp_path,
        progress=False, log=None)
    assert plain["n_items"] == n and len(plain["files"]) == 4
    expected, got = cached(tmp_path), cached(features)
    assert sorted(got) == sorted(expected)
    for name, feats in expected.items():
        assert np.abs(got[name] - feats).max() <= 1e-5, name


def test_train_after_extract_does_not_extract_again(killed_and_resumed):
    r = killed_and_resumed
    features = r["run_dir"] / "features"
    before = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    train = subprocess.run(
        [sys.executable, "-m", "fashionrec", "train", *r["options"], "--run-dir",
         str(r["run_dir"]), "--epochs", "1", "--no-progress"],
        capture_output=True, text=True, env=cli_env(), timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in features.iterdir()} == before
    extract_s = float(re.search(r"timings: +extract ([\d.]+) s", train.stdout).group(1))
    assert extract_s < 5, train.stdout
    assert "42 products" in train.stdout
