import hashlib

import h5py
import keras
import numpy as np
import pytest
from models import tiny_backbone  # tests/test_serve.py imports it from here too

from fashionrec import FashionrecError
from fashionrec import extract as ex
from fashionrec.extract import FeatureExtractor, build_backbone, cached_features, to_model_input

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (10, 28, 28)).astype(np.uint8)


@pytest.fixture(scope="module")
def random_resnet():
    return build_backbone(weights="none", image_size=32, seed=7, log=None)


def test_model_input_is_resized_rgb_and_preprocessed():
    x = np.asarray(to_model_input(np.full((2, 28, 28), 200, np.uint8), 32))
    assert x.shape == (2, 32, 32, 3)
    # caffe preprocessing: RGB->BGR and ImageNet means subtracted
    np.testing.assert_allclose(x[0, 5, 5], [200 - 103.939, 200 - 116.779, 200 - 123.68],
                               rtol=1e-5)


def test_model_input_rejects_bad_shapes():
    with pytest.raises(FashionrecError, match="images must be"):
        to_model_input(np.zeros((2, 28)), 32)


def test_random_resnet_is_seeded_and_2048_d(random_resnet):
    model, info = random_resnet
    assert info.feature_dim == 2048 and info.weights == "none" and info.seed == 7
    again, _ = build_backbone(weights="none", image_size=32, seed=7, log=None)
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_batching_does_not_change_features(random_resnet):
    model, info = random_resnet
    one = FeatureExtractor(model, info, batch_size=1).transform(IMAGES[:5])
    many = FeatureExtractor(model, info, batch_size=4).transform(IMAGES[:5])
    assert one.shape == (5, 2048) and one.dtype == np.float32
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-4)


def test_streaming_to_hdf5_matches_in_memory(random_resnet, tmp_path):
    ext = FeatureExtractor(*random_resnet, batch_size=3)
    path = ext.transform_to_h5(IMAGES, tmp_path / "f.h5", progress=False)
    with h5py.File(path) as f:
        np.testing.assert_allclose(f["features"][:], ext.transform(IMAGES), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5"]  # no temp file left behind


def test_feature_cache_is_reused_and_keyed_on_the_images(random_resnet, tmp_path, monkeypatch):
    ext = FeatureExtractor(*random_resnet, batch_size=4)
    first = cached_features(ext, IMAGES, tmp_path, "train", progress=False)

    def boom(*a, **k):
        raise AssertionError("re-extracted although cached")

    monkeypatch.setattr(ext, "iter_batches", boom)
    np.testing.assert_array_equal(cached_features(ext, IMAGES, tmp_path, "train", False), first)
    monkeypatch.undo()
    other = IMAGES.copy()
    other[0] = 0
    changed = cached_features(ext, other, tmp_path, "train", progress=False)
    assert not np.allclose(changed[0], first[0])


def test_custom_backbone_file(tmp_path):
    path = tiny_backbone(tmp_path / "tiny.keras")
    model, info = build_backbone(str(path), image_size=32, log=None)
    assert info.backbone == "custom" and info.feature_dim == 4
    assert info.model_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert FeatureExtractor(model, info).transform(IMAGES[:2]).shape == (2, 4)


def test_backbone_that_is_not_a_vector_is_refused(tmp_path):
    path = tiny_backbone(tmp_path / "map.keras", out_rank=4)
    with pytest.raises(FashionrecError, match="not one feature vector"):
        build_backbone(str(path), image_size=32, log=None)


def test_garbage_backbone_file_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(FashionrecError, match="cannot load backbone"):
        build_backbone(str(path), image_size=32, log=None)


def _official_lookalike(tmp_path, monkeypatch):
    """A ResNet50 weights file in Keras's legacy h5 layout, its MD5 made 'official'."""
    src = keras.applications.ResNet50(include_top=False, pooling="avg", weights=None,
                                      input_shape=(32, 32, 3))
    weights = tmp_path / "origin" / ex.IMAGENET_NOTOP[0]
    weights.parent.mkdir()
    src.save(weights)  # legacy .h5: loadable by ResNet50(weights=path)
    md5 = hashlib.md5(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(ex, "IMAGENET_NOTOP", (ex.IMAGENET_NOTOP[0], md5))
    return src, weights


def test_imagenet_weights_from_a_preplaced_keras_cache(tmp_path, monkeypatch):
    src, weights = _official_lookalike(tmp_path, monkeypatch)
    cache = tmp_path / "keras"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / weights.name).write_bytes(weights.read_bytes())
    monkeypatch.setattr(ex, "WEIGHTS_BASE_URL", "http://unreachable.invalid/")  # offline
    model, info = build_backbone(weights="imagenet", image_size=32, cache_dir=str(cache),
                                 log=None)
    assert info.weights == "imagenet" and info.feature_dim == 2048
    x = to_model_input(IMAGES[:2], 32)
    np.testing.assert_allclose(model.predict_on_batch(x), src.predict_on_batch(x), rtol=1e-5)


def test_imagenet_weights_downloaded_with_hash_check(tmp_path, monkeypatch):
    _, weights = _official_lookalike(tmp_path, monkeypatch)
    monkeypatch.setattr(ex, "WEIGHTS_BASE_URL", weights.parent.as_uri() + "/")
    path = ex.fetch_imagenet_weights(cache_dir=str(tmp_path / "keras"))
    assert path == tmp_path / "keras" / "models" / weights.name
    # a corrupt origin fails the hash check
    weights.write_bytes(b"corrupt")
    path.unlink()
    with pytest.raises(FashionrecError, match="could not be downloaded"):
        ex.fetch_imagenet_weights(cache_dir=str(tmp_path / "keras"))


def test_no_weights_and_no_standin_stops_with_ways_forward(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "WEIGHTS_BASE_URL", "http://unreachable.invalid/")
    monkeypatch.setattr(ex, "shared_dirs", lambda: [])
    with pytest.raises(FashionrecError, match="Ways forward: .*--weights none"):
        build_backbone(weights="imagenet", image_size=32, cache_dir=str(tmp_path), log=None)


def test_standin_is_used_and_announced_when_weights_are_missing(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "models").mkdir(parents=True)
    tiny_backbone(shared / "models" / ex.STANDIN_NAME)
    monkeypatch.setattr(ex, "WEIGHTS_BASE_URL", "http://unreachable.invalid/")
    monkeypatch.setattr(ex, "shared_dirs", lambda: [shared])
    said = []
    _, info = build_backbone(weights="imagenet", image_size=32, cache_dir=str(tmp_path / "k"),
                             log=said.append)
    assert said[0].startswith("NOTE: official ResNet50 ImageNet weights unavailable")
    assert "stand-in" in info.note and info.model_path == str(shared / "models" / ex.STANDIN_NAME)


def test_real_standin_gives_1024_d(fmnist_dir):
    path = fmnist_dir.parent.parent / "models" / ex.STANDIN_NAME
    if not path.is_file():
        pytest.skip("no stand-in model")
    model, info = build_backbone(str(path), image_size=32, log=None)
    assert info.feature_dim == 1024
    assert info.model_sha256 == ex.STANDIN_SHA256


def test_custom_backbone_with_weights_file_rebuilds_and_notices_changes(tmp_path):
    path = tiny_backbone(tmp_path / "tiny.keras")
    other = keras.saving.load_model(path)
    other.set_weights([w + 1 for w in other.get_weights()])
    weights = tmp_path / "other.weights.h5"
    other.save_weights(weights)
    model, info = build_backbone(str(path), weights=str(weights), image_size=32, log=None)
    assert info.weights == "file" and info.weights_hash and info.model_sha256
    x = to_model_input(IMAGES[:2], 32)
    np.testing.assert_allclose(model.predict_on_batch(x), other.predict_on_batch(x), rtol=1e-5)
    again = ex.rebuild_backbone(info)
    np.testing.assert_allclose(again.predict_on_batch(x), other.predict_on_batch(x), rtol=1e-5)
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(FashionrecError, match="has changed since training"):
        ex.rebuild_backbone(info)


def test_gem_pooling_pools_the_same_feature_map(tmp_path):
    """``pooling="gem"``: (mean(x^3))^(1/3) of the map the average pooling would see,
    a different fingerprint (feature caches never mix), rebuilt the same from the run's
    record; a backbone without a final average pooling is refused in one line."""
    from fashionrec.extract import BackboneInfo, rebuild_backbone, with_pooling

    avg, info_avg = build_backbone(weights="none", image_size=32, log=None)
    gem, info_gem = build_backbone(weights="none", image_size=32, log=None, pooling="gem")
    assert info_gem.pooling == "gem" and info_gem.fingerprint != info_avg.fingerprint
    x = np.random.default_rng(0).uniform(-100, 100, (2, 32, 32, 3)).astype("float32")
    fmap = np.asarray(keras.Model(avg.input, avg.layers[-1].input)(x))
    expected = np.mean(np.maximum(fmap, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    np.testing.assert_allclose(np.asarray(gem(x)), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(avg(x)), fmap.mean(axis=(1, 2)), rtol=1e-4,
                               atol=1e-6)
    again = rebuild_backbone(BackboneInfo.from_dict(info_gem.to_dict()))
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(gem(x)), rtol=1e-5)
    flat = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()])
    with pytest.raises(FashionrecError, match="GeM pooling needs"):
        with_pooling(flat, "gem")
