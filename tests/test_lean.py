"""Lean replicas: an OpenVINO run loads a NumPy copy of its head and its backbone's
OpenVINO IR, and answers without importing TensorFlow or Keras, as the Keras path does;
runs saved without those files still load."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import keras
import numpy as np
import pytest
from catalogs import make_folder_catalog
from conftest import TINY_MODEL
from models import same_answers
from serving import fashionrec_serve

from fashionrec import ClassifierHead, FashionrecError, Recommender
from fashionrec.catalog import Catalog
from fashionrec.cli import needs_tensorflow
from fashionrec.cli.parser import build_parser
from fashionrec.lean import NumpyHead, export_head, serves_lean
from fashionrec.rundir import RunDir

pytest.importorskip("openvino")

# float32 everywhere: the Keras path and the lean one must agree to 1e-4
TINY = {**TINY_MODEL, "extract_batch_size": 8, "engine": "openvino", "precision": "float32"}
RNG = np.random.default_rng(11)


# ----------------------------------------------------------------- the NumPy head
@pytest.fixture(scope="module")
def keras_head():
    """A head trained on random features of 3 classes (2 epochs), and fresh features."""
    X = RNG.normal(2.0, 3.0, (60, 40)).astype(np.float32)
    y = np.arange(60) % 3
    head = ClassifierHead(n_classes=3, epochs=2, batch_size=16, verbose=0).fit(X, y)
    fresh = RNG.normal(2.0, 6.0, (25, 40)).astype(np.float32)  # wider than the training
    return head, fresh


def test_numpy_head_answers_as_the_keras_head(keras_head, tmp_path):
    head, X = keras_head
    export_head(head, tmp_path / "head_weights.h5", "run-1")
    lean = NumpyHead.load(tmp_path / "head_weights.h5")
    probs, ref_probs = lean.predict_proba(X), head.predict_proba(X)
    emb, ref_emb = lean.embed(X), head.embed(X)
    assert probs.shape == (25, 3) and emb.shape == (25, 512)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-4 * max(1.0, np.abs(ref_emb).max()),
                               rtol=0)
    assert (lean.predict(X) == head.predict(X)).all()
    assert lean.run_id_ == "run-1" and lean.n_classes == 3
    # a batch at a time answers the same as all at once
    np.testing.assert_allclose(lean.embed(X, batch_size=7), emb, rtol=0, atol=0)


def test_the_weights_file_is_self_describing_hdf5(keras_head, tmp_path):
    head, _ = keras_head
    path = export_head(head, tmp_path / "w.h5", "run-1")
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "fashionrec-head-weights" and "description" in f.attrs
        # the design card's head: Dense 1024 relu -> Dense 512 relu (dense_mid) -> softmax
        assert json.loads(f.attrs["layers"]) == [["dense_1", "relu"], ["dense_mid", "relu"],
                                                 ["probs", "softmax"]]
        assert f["layers/dense_1/kernel"].shape == (40, 1024)
        assert f["layers/probs/bias"].shape == (3,)
        np.testing.assert_array_equal(f["scaler/mean"][()], head.scaler_.mean_)
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left


def test_softmax_is_stable_for_large_logits(tmp_path):
    """Logits in the thousands: no overflow, the same as Keras's own softmax."""
    kernel = np.eye(4, dtype=np.float32) * 900.0
    bias = np.array([0.0, 50.0, -3000.0, 2.0], np.float32)
    lean = NumpyHead(np.zeros(4), np.ones(4), [("dense_mid", "linear", kernel, bias),
                                              ("probs", "softmax", np.eye(4, dtype=np.float32),
                                               np.zeros(4, np.float32))])
    x = np.array([[3.0, 1.0, 0.5, -2.0], [-1.0, 4.0, 9.0, 0.0]], np.float32)
    got = lean.predict_proba(x)
    expected = np.asarray(keras.activations.softmax(keras.ops.convert_to_tensor(
        x * 900.0 + bias)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "foreign", "truncated"])
def test_a_bad_weights_file_is_one_line(keras_head, tmp_path, damage):
    head, _ = keras_head
    path = tmp_path / "w.h5"
    if damage == "foreign":
        with h5py.File(path, "w") as f:
            f["x"] = np.zeros(3)
    elif damage == "truncated":
        export_head(head, path, "r")
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(FashionrecError) as err:
        NumpyHead.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


# ----------------------------------------------------------------- an OpenVINO run
@pytest.fixture(scope="module")
def ov_run(tmp_path_factory):
    """A tiny catalog run made with engine OpenVINO (float32): ``(shop, good, run)``."""
    root = tmp_path_factory.mktemp("lean")
    good, _ = make_folder_catalog(root / "shop", n_per_class=6)
    catalog = Catalog.from_folder(root / "shop", label_depth=2)
    rec = Recommender(**TINY).fit_catalog(catalog, min_class_size=5, progress=False, log=None)
    rec.save(root / "run")
    return root / "shop", good, root / "run"


ANSWER = textwrap.dedent("""
    import json, sys
    from fashionrec import Recommender
    rec = Recommender.load(sys.argv[1])
    photo = rec.recommend(sys.argv[2], k=5)
    item = rec.recommend(item=sys.argv[3], k=5)
    print(json.dumps({
        "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules,
        "head": type(rec.embedder_.head).__name__,
        "photo": [[i.id, i.distance] for i in photo.items],
        "item": [[i.id, i.distance] for i in item.items]}))
""")


def answer(run, photo, item, **env):
    """What a fresh process that loads ``run`` answers a photo and an item query."""
    out = subprocess.run([sys.executable, "-c", ANSWER, str(run), str(photo), item],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same_answers(a, b):
    same_answers(a, b, ("photo", "item"), atol=1e-4)


def test_the_run_saves_its_numpy_head_and_backbone_ir(ov_run):
    _, _, run = ov_run
    version = RunDir(run).current()
    assert version.head_weights.is_file() and version.backbone_ir.is_file()
    assert version.backbone_ir_weights.is_file()
    assert serves_lean(run)


def test_a_fresh_process_answers_without_tensorflow_as_keras_does(ov_run):
    shop, good, run = ov_run
    lean = answer(run, shop / good[0], good[4])
    assert not lean["tensorflow"] and not lean["keras"]
    assert lean["head"] == "NumpyHead"
    heavy = answer(run, shop / good[0], good[4], FASHIONREC_ENGINE_PATH="keras")
    assert heavy["tensorflow"] and heavy["head"] == "ClassifierHead"
    assert_same_answers(lean, heavy)
    assert lean["photo"][0][0] == good[0]  # the photo of a catalog item finds it


def test_a_run_saved_without_the_lean_files_still_loads(ov_run, tmp_path):
    shop, good, run = ov_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    version = RunDir(old).current()
    for path in (version.head_weights, version.backbone_ir, version.backbone_ir_weights):
        path.unlink()
    assert not serves_lean(old)
    rec = Recommender.load(old, log=None)
    assert isinstance(rec.embedder_.head, ClassifierHead)  # the Keras head, as before
    assert rec.embedder_.backbone_ir is None
    assert_same_answers(answer(old, shop / good[0], good[4]), answer(run, shop / good[0], good[4]))


def test_a_lean_run_needs_no_backbone_file(ov_run, tmp_path):
    """The IR is the backbone: an OpenVINO run whose saved Keras backbone is gone still
    answers photo queries, without TensorFlow."""
    from models import tiny_backbone

    shop, good, _ = ov_run
    (tmp_path / "bb").mkdir()
    backbone = tiny_backbone(tmp_path / "bb" / "tiny.keras")
    rec = Recommender(**{**TINY, "backbone": str(backbone), "weights": "imagenet"}).fit_catalog(
        Catalog.from_folder(shop, label_depth=2), min_class_size=5, progress=False, log=None)
    rec.save(tmp_path / "run")
    expected = rec.recommend(shop / good[0], k=5)
    shutil.rmtree(tmp_path / "bb")
    got = answer(tmp_path / "run", shop / good[0], good[4])
    assert not got["tensorflow"]
    assert [i for i, _ in got["photo"]] == [i.id for i in expected.items]
    np.testing.assert_allclose([d for _, d in got["photo"]],
                               [i.distance for i in expected.items], atol=1e-4, rtol=0)


def test_an_ir_of_another_backbone_is_refused_in_one_line(ov_run, tmp_path):
    from fashionrec.engine import read_ir

    _, _, run = ov_run
    rec = Recommender.load(run, log=None)
    other = type(rec.embedder_.info).from_dict({**rec.embedder_.info.to_dict(), "seed": 99})
    with pytest.raises(FashionrecError) as err:
        read_ir(rec.embedder_.backbone_ir, other)
    assert "another backbone" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "bad.xml").write_text("<net>")
    with pytest.raises(FashionrecError, match="cannot read the backbone IR") as err:
        read_ir(tmp_path / "bad.xml", rec.embedder_.info)
    assert "\n" not in str(err.value)


def test_preprocessing_equals_keras_bit_for_bit():
    from keras.applications.resnet50 import preprocess_input as keras_preprocess

    from fashionrec.extract import preprocess_input

    x = RNG.uniform(0, 255, (4, 9, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.ascontiguousarray(preprocess_input(x.copy())),
                                  np.ascontiguousarray(keras_preprocess(x.copy())))


# ----------------------------------------------------------------- the service
def test_serve_of_an_openvino_run_never_imports_tensorflow(ov_run, tmp_path):
    """``fashionrec serve`` (a real process): ready, then a photo query and an item
    query answered as the library answers them, with no TensorFlow library mapped."""
    import httpx

    shop, good, run = ov_run
    args = build_parser().parse_args(["serve", "--run-dir", str(run)])
    assert not needs_tensorflow(args)
    assert needs_tensorflow(build_parser().parse_args(["serve", "--run-dir", str(run),
                                                       "--engine-path", "keras"]))
    proc, url = fashionrec_serve(run)
    try:
        photo = httpx.post(url + "/api/similar", data={"k": "5"}, timeout=60, files={
            "image": ("q.jpg", (shop / good[0]).read_bytes())}).json()
        item = httpx.get(f"{url}/api/items/{good[4]}/similar", params={"k": 5},
                         timeout=60).json()
        maps = (open(f"/proc/{proc.pid}/maps").read() if os.path.exists("/proc")
                else "")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    # TensorFlow's own libraries (OpenVINO's small TF frontend library is not one)
    assert "site-packages/tensorflow/" not in maps and "_pywrap_tensorflow" not in maps
    served = {"photo": [[i["id"], i["distance"]] for i in photo["items"]],
              "item": [[i["id"], i["distance"]] for i in item["items"]]}
    assert_same_answers(served, answer(run, shop / good[0], good[4],
                                       FASHIONREC_ENGINE_PATH="keras"))


def test_a_bad_engine_path_is_one_line(ov_run):
    _, _, run = ov_run
    out = subprocess.run([sys.executable, "-m", "fashionrec", "serve", "--run-dir", str(run)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FASHIONREC_ENGINE_PATH": "torch"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "FASHIONREC_ENGINE_PATH" in lines[0], out.stderr
