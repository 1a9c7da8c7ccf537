import zipfile

import numpy as np
import pytest

from fashionrec import ClassifierHead, FashionrecError
from fashionrec.head import MID_LAYER


def blobs(n=120, d=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centers = rng.normal(0, 4, (classes, d))
    return (centers[y] + rng.normal(0, 1, (n, d)) + 100).astype(np.float32), y


@pytest.fixture(scope="module")
def fitted():
    X, y = blobs()
    return ClassifierHead(n_classes=3, epochs=15, batch_size=16, verbose=0).fit(X, y), X, y


def test_head_learns_separable_classes(fitted):
    head, X, y = fitted
    assert (head.predict(X) == y).mean() > 0.9
    assert set(head.history_) >= {"accuracy", "loss", "val_accuracy", "val_loss"}
    assert len(head.history_["loss"]) == 15


def test_architecture_follows_the_recipe(fitted):
    head, X, _ = fitted
    layers = {layer.name: layer for layer in head.model_.layers}
    assert layers["dense_1"].units == 1024 and layers[MID_LAYER].units == 512
    assert layers["dropout_1"].rate == 0.7 and layers["dropout_2"].rate == 0.7
    assert head.model_.output_shape == (None, 3)
    assert head.embed(X[:5]).shape == (5, 512)


def test_features_are_standardized_before_the_network(fitted):
    head, X, _ = fitted
    z = head.scaler_.transform(X)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-3)


def test_class_weights_are_balanced():
    X, y = blobs(n=90)
    y = np.where(np.arange(90) < 60, 0, np.where(np.arange(90) < 80, 1, 2))  # 60/20/10
    head = ClassifierHead(n_classes=4, epochs=1, verbose=0).fit(X, y)
    # n / (classes_present * count); class 3 is absent and keeps weight 1
    assert head.class_weight_ == pytest.approx({0: 0.5, 1: 1.5, 2: 3.0, 3: 1.0})


def test_same_seed_same_head():
    X, y = blobs()
    a = ClassifierHead(n_classes=3, epochs=2, seed=3, verbose=0).fit(X, y)
    b = ClassifierHead(n_classes=3, epochs=2, seed=3, verbose=0).fit(X, y)
    for wa, wb in zip(a.model_.get_weights(), b.model_.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_save_load_round_trip_without_pickle(fitted, tmp_path):
    head, X, _ = fitted
    head.save(tmp_path / "h.keras", tmp_path / "h.json")
    loaded = ClassifierHead.load(tmp_path / "h.keras", tmp_path / "h.json")
    np.testing.assert_allclose(loaded.embed(X), head.embed(X), rtol=1e-6)
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=1e-6)
    names = zipfile.ZipFile(tmp_path / "h.keras").namelist()
    assert not [n for n in names if n.endswith((".pkl", ".pickle"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.json", "h.keras"]


def test_bad_inputs():
    X, y = blobs()
    with pytest.raises(FashionrecError, match="do not match"):
        ClassifierHead(n_classes=3).fit(X, y[:-1])
    with pytest.raises(FashionrecError, match="labels must lie"):
        ClassifierHead(n_classes=2).fit(X, y)
    with pytest.raises(FashionrecError, match="not trained"):
        ClassifierHead(n_classes=3).embed(X)
