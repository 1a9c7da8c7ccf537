"""Inference engines: the choice (auto), agreement with Keras float32 on a tiny backbone,
cache keys, and one-line errors."""

import hashlib
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from fashionrec import FashionrecError
from fashionrec import engine as en
from fashionrec.extract import BackboneInfo, FeatureExtractor, build_backbone

RNG = np.random.default_rng(3)
IMAGES = RNG.integers(0, 256, (12, 32, 32, 3)).astype(np.uint8)


def tiny_model(path):
    """A small conv backbone (a saved .keras file) ending in global average pooling."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(24, 3, strides=2, activation="relu", name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, x).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("engine") / "tiny.keras")


def features(path, engine, precision, pooling="avg"):
    model, info = build_backbone(path, image_size=32, log=None, engine=engine,
                                 precision=precision, pooling=pooling)
    return FeatureExtractor(model, info, batch_size=5).transform(IMAGES), info


def cosines(a, b):
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------- choice
@pytest.mark.parametrize("flags,have,expected", [
    ({"avx512_bf16"}, True, ("openvino", "bfloat16")),
    ({"amx_bf16", "amx_tile"}, True, ("openvino", "bfloat16")),
    ({"avx2"}, True, ("keras", "float32")),  # no native bf16: the recipe's float32
    ({"avx512_bf16"}, False, ("keras", "float32")),  # OpenVINO not installed
])
def test_auto_picks_openvino_bf16_only_where_the_cpu_has_native_bf16(flags, have, expected):
    engine, precision, why = en.resolve("auto", "auto", flags=flags, have_openvino=have)
    assert (engine, precision) == expected
    assert why.startswith("auto")


def test_explicit_choices_are_kept():
    assert en.resolve("keras", "bfloat16", flags=set(), have_openvino=False)[:2] == (
        "keras", "bfloat16")
    assert en.resolve("openvino", "auto", flags={"avx2"}, have_openvino=True)[:2] == (
        "openvino", "float32")
    assert en.resolve("auto", "float32", flags={"avx512_bf16"}, have_openvino=True)[:2] == (
        "keras", "float32")


def test_bfloat16_asked_for_without_native_bf16_says_so():
    """A run asked to compute in bfloat16 where the CPU has none says, on its engine
    line, that it is not the measured fast path."""
    for engine in ("openvino", "keras"):
        why = en.resolve(engine, "bfloat16", flags={"avx2"}, have_openvino=True)[2]
        assert "no native bfloat16" in why
    assert "no native" not in en.resolve("openvino", "bfloat16", flags={"avx512_bf16"},
                                         have_openvino=True)[2]


def test_unknown_or_missing_engine_is_one_line():
    with pytest.raises(FashionrecError, match="engine must be one of"):
        en.resolve("tensorrt")
    with pytest.raises(FashionrecError, match="precision must be one of"):
        en.resolve("keras", "float16")
    with pytest.raises(FashionrecError, match=r"pip install 'fashionrec\[openvino\]'"):
        en.resolve("openvino", "float32", have_openvino=False)


def test_openvino_missing_at_load_is_one_line(monkeypatch, tiny):
    model, _ = build_backbone(tiny, image_size=32, log=None, engine="keras")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(FashionrecError, match=r"not installed .*fashionrec\[openvino\]"):
        en.make_engine(model, "openvino", "float32", 32)


def test_cli_engine_without_openvino_is_one_line(tmp_path):
    code = ("import sys; sys.modules['openvino'] = None; from fashionrec.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "train", "--engine", "openvino",
                          "--weights", "none", "--run-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "OpenVINO is not installed" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------- agreement
def test_engines_agree_with_keras_float32(tiny):
    """Tolerances: float32 engines to 1e-4 of the features' scale; bfloat16 (8-bit
    mantissa) to a cosine of 0.999 and 3 % of the scale."""
    pytest.importorskip("openvino")
    ref, info = features(tiny, "keras", "float32")
    scale = np.abs(ref).max()
    assert info.engine == "keras" and info.precision == "float32"
    ov32, info = features(tiny, "openvino", "float32")
    assert info.engine == "openvino" and info.engine_version
    assert np.abs(ov32 - ref).max() <= 1e-4 * scale
    for engine in ("openvino", "keras"):
        bf16, info = features(tiny, engine, "bfloat16")
        assert info.precision == "bfloat16"
        assert cosines(bf16, ref).min() >= 0.999
        assert np.abs(bf16 - ref).max() <= 3e-2 * scale
        assert not np.array_equal(bf16, ref)  # it did compute in bfloat16


def test_openvino_runs_gem_pooling_and_any_batch_size(tiny):
    pytest.importorskip("openvino")
    ref, _ = features(tiny, "keras", "float32", pooling="gem")
    model, info = build_backbone(tiny, image_size=32, log=None, engine="openvino",
                                 precision="float32", pooling="gem")
    one_by_one = FeatureExtractor(model, info, batch_size=1).transform(IMAGES[:3])
    batched = FeatureExtractor(model, info, batch_size=12).transform(IMAGES)
    np.testing.assert_allclose(one_by_one, batched[:3], rtol=1e-5, atol=1e-6)
    assert np.abs(batched - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("engine", ["keras", "openvino"])
def test_map_streams_batches_in_order_and_threads_share_an_engine(tiny, engine):
    """``engine.map`` (what extraction runs: OpenVINO keeps the next batch queued)
    answers every batch as a call on it alone would, in order with its key, for batch
    sizes 0, 1 and more; stopping it early, or calling from several threads at once,
    leaves the engine giving the same answers."""
    if engine == "openvino":
        pytest.importorskip("openvino")
    from concurrent.futures import ThreadPoolExecutor

    from fashionrec.extract import to_model_input

    model, info = build_backbone(tiny, image_size=32, log=None, engine=engine,
                                 precision="float32")
    eng = en.make_engine(model, info.engine, info.precision, 32)
    x = to_model_input(IMAGES, 32)
    ref = np.asarray(model.predict_on_batch(x))  # Keras itself, one call
    cuts = [(0, 5), (5, 5), (5, 6), (6, 12), (0, 12)]
    got = list(eng.map(((lo, hi), x[lo:hi]) for lo, hi in cuts))
    assert [key for key, _ in got] == cuts
    for (lo, hi), feats in got:
        assert feats.shape == (hi - lo, ref.shape[1])
        np.testing.assert_allclose(feats, ref[lo:hi], rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    stream = eng.map((i, x) for i in range(5))
    next(stream)
    stream.close()  # batches still in flight are finished and put away
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: eng(x[i:i + 4]), range(0, 12, 2)))
    for i, feats in zip(range(0, 12, 2), answers, strict=True):
        np.testing.assert_allclose(feats, ref[i:i + 4], rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())


# ----------------------------------------------------------------- keys
def test_cache_key_changes_with_engine_and_precision_and_keeps_old_keys():
    info = BackboneInfo("custom", "saved-model", 8, 32, model_path="m.keras",
                        model_sha256="ab" * 32)
    # the key runs had before engines existed: sha256 of this list, 16 hex digits
    legacy = hashlib.sha256(json.dumps(
        ["custom", "saved-model", "ab" * 32, None, 32, 8]).encode()).hexdigest()[:16]
    assert info.fingerprint == legacy
    keys = {info.fingerprint}
    for engine, precision in (("keras", "bfloat16"), ("openvino", "float32"),
                              ("openvino", "bfloat16")):
        other = BackboneInfo.from_dict({**info.to_dict(), "engine": engine,
                                        "precision": precision})
        keys.add(other.fingerprint)
    assert len(keys) == 4
    versioned = BackboneInfo.from_dict({**info.to_dict(), "engine": "openvino",
                                        "precision": "bfloat16", "engine_version": "x"})
    assert versioned.fingerprint == BackboneInfo.from_dict(
        {**info.to_dict(), "engine": "openvino", "precision": "bfloat16"}).fingerprint


def test_old_run_records_load_as_keras_float32():
    old = {"backbone": "resnet50", "weights": "none", "feature_dim": 2048, "image_size": 32,
           "seed": 1, "pooling": "avg"}
    info = BackboneInfo.from_dict(old)
    assert (info.engine, info.precision) == ("keras", "float32")


def test_an_engine_that_fails_to_compile_is_one_line(monkeypatch, tiny):
    ov = pytest.importorskip("openvino")
    model, _ = build_backbone(tiny, image_size=32, log=None, engine="keras")

    def broken(*args, **kwargs):
        raise RuntimeError("Check 'node' failed at src/core/\nunsupported operation Foo")

    monkeypatch.setattr(ov, "convert_model", broken)
    with pytest.raises(FashionrecError) as err:
        en.make_engine(model, "openvino", "bfloat16", 32)
    message = str(err.value)
    assert "\n" not in message and "unsupported operation Foo" in message
    assert "--engine keras" in message
