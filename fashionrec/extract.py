"""Stage 2 — extract: a frozen backbone turns images into feature vectors.

The default backbone is Keras's ResNet50 (``include_top=False, pooling='avg'``,
2048-d) with the official ImageNet weights from Keras's cache or a checked
download. Where those cannot be had and ``../shared/models`` holds the stage-4
ImageNet ResNet50 (1024-d), that stand-in is used instead and the run says so.

Extraction is batched and streamed: each batch of 28x28 images is resized,
turned RGB and preprocessed on its own, so peak memory does not grow with the
number of images; features can be streamed straight into HDF5.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from .artifacts import atomic_path, file_digest, sha256_file, short_reason
from .config import POOLINGS, shared_dirs
from .errors import FashionrecError

WEIGHTS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
# The official Keras ResNet50 no-top weights and their published MD5 (the hash
# keras.applications itself checks).
IMAGENET_NOTOP = ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                  "a268eb855778b3df3c7506639542a6af")
STANDIN_NAME = "resnet50_conv4_imagenet.keras"
STANDIN_SHA256 = "544665033561ee1f8eee3c8928e289ad71e2691e54c9135d1b80213f24dd3ef8"


@dataclass
class BackboneInfo:
    """What made the features: enough to rebuild the same backbone elsewhere."""

    backbone: str  # "resnet50" or "custom" (a saved .keras model)
    weights: str  # "imagenet", "none", "file" or "saved-model"
    feature_dim: int
    image_size: int
    model_path: str | None = None  # the saved model (custom)
    model_sha256: str | None = None
    weights_path: str | None = None  # the weights file loaded, if any
    weights_hash: str | None = None  # its SHA-256 (the published MD5 for ImageNet)
    seed: int | None = None  # random init (weights "none")
    note: str = ""  # e.g. why the stand-in was used
    pooling: str = "avg"  # how the last feature map becomes a vector: "avg" or "gem"

    @property
    def fingerprint(self):
        """A short id of the function images -> features (for caches)."""
        key = [self.backbone, self.weights, self.model_sha256 or self.weights_hash,
               self.seed, self.image_size, self.feature_dim]
        if self.model_sha256 and self.weights_hash:
            key.append(self.weights_hash)
        if self.pooling != "avg":  # average-pooled runs keep the fingerprint they had
            key.append(self.pooling)
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def describe(self):
        what = "ResNet50" if self.backbone == "resnet50" else f"backbone {self.model_path}"
        weights = {
            "imagenet": "ImageNet weights",
            "none": f"random weights (seed {self.seed})",
            "file": f"weights from {self.weights_path}",
            "saved-model": "weights saved in the model",
        }[self.weights]
        pooled = ", GeM-pooled (p=3)" if self.pooling == "gem" else ""
        return f"{what}, {weights}, {self.feature_dim}-d features{pooled} at {self.image_size} px"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)  # runs saved before pooling was a choice get "avg"


def fetch_imagenet_weights(cache_dir=None, timeout=30):
    """Path of the official ResNet50 no-top ImageNet weights.

    Uses Keras's cache (``cache_dir``, default ``$KERAS_HOME`` or ``~/.keras``, then
    ``models/``) when the file there has the published hash, else downloads it there
    (``timeout`` seconds per network operation, for this download only) and checks the
    hash before the file takes its name. Raises :class:`FashionrecError` if neither
    works.
    """
    import shutil
    import urllib.request

    fname, md5 = IMAGENET_NOTOP
    base = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    target = base / "models" / fname
    if target.is_file() and file_digest(target, "md5") == md5:
        return target
    try:
        with urllib.request.urlopen(WEIGHTS_BASE_URL + fname, timeout=timeout) as response, \
                atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(response, fh, 1 << 20)
            if file_digest(tmp, "md5") != md5:
                raise ValueError("the file's MD5 is not the published one")
    except Exception as exc:  # urllib, hash and OS errors all mean "not available"
        raise FashionrecError(
            f"ImageNet weights {fname} are not in Keras's cache and could not be "
            f"downloaded ({short_reason(exc)})"
        ) from None
    return target


GEM_P = 3.0


def gem_pooling_layer():
    """Generalized-mean pooling, ``(mean(x^p))^(1/p)`` over the spatial axes with p = 3
    (Radenović et al.): between average (p=1) and max pooling, it weighs the strongest
    activations of a feature map more, which sharpens retrieval features."""
    import keras

    class GeMPooling2D(keras.layers.Layer):
        def call(self, x):
            ops = keras.ops
            x = ops.power(ops.maximum(x, 1e-6), GEM_P)
            return ops.power(ops.mean(x, axis=(1, 2)), 1.0 / GEM_P)

    return GeMPooling2D(name="gem_pool")


def with_pooling(model, pooling, source="the backbone"):
    """``model`` (ending in global average pooling) with that pooling replaced:
    ``"avg"`` keeps it, ``"gem"`` pools the same feature map with GeM."""
    import keras

    if pooling not in POOLINGS:
        raise FashionrecError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "avg":
        return model
    last = model.layers[-1]
    if not isinstance(last, keras.layers.GlobalAveragePooling2D):
        raise FashionrecError(f"GeM pooling needs {source} to end in global average "
                              f"pooling over a feature map; it ends in {type(last).__name__}")
    return keras.Model(model.input, gem_pooling_layer()(last.input), name=f"{model.name}_gem")


def find_standin():
    """The stage-4 ImageNet ResNet50 in ``../shared/models``, if present."""
    for shared in shared_dirs():
        path = shared / "models" / STANDIN_NAME
        if path.is_file():
            return path
    return None


def _check_vector_model(model, source, image_size):
    shape = tuple(model.output_shape) if not isinstance(model.output_shape, list) else None
    if shape is None or len(shape) != 2 or shape[1] is None:
        raise FashionrecError(
            f"backbone {source} outputs {model.output_shape}, not one feature vector "
            f"per image; end it with a pooling or flatten layer"
        )
    in_shape = tuple(model.input_shape) if not isinstance(model.input_shape, list) else ()
    if len(in_shape) != 4 or in_shape[-1] != 3:
        raise FashionrecError(
            f"backbone {source} takes input {model.input_shape}; it must take (N, H, W, 3)"
        )
    if in_shape[1] not in (None, image_size) or in_shape[2] not in (None, image_size):
        raise FashionrecError(
            f"backbone {source} takes {in_shape[1]}x{in_shape[2]} images, "
            f"not the {image_size} px asked for"
        )
    return int(shape[1])


def _load_saved_backbone(path, image_size):
    import keras

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise FashionrecError(
            f"cannot load backbone {path} as a Keras model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return model, _check_vector_model(model, path, image_size)


def _resnet50(weights, image_size, seed):
    import keras

    keras.utils.set_random_seed(seed)
    try:
        return keras.applications.ResNet50(
            include_top=False, pooling="avg", weights=weights,
            input_shape=(image_size, image_size, 3),
        )
    except (ValueError, OSError) as exc:
        raise FashionrecError(
            f"cannot load ResNet50 weights from {weights}: {str(exc).splitlines()[0]}"
        ) from None


def build_backbone(backbone="resnet50", weights="imagenet", image_size=224, seed=1234,
                   cache_dir=None, allow_standin=True, log=print, pooling="avg"):
    """Build the backbone a run asks for; return ``(model, BackboneInfo)``.

    Args:
        backbone: ``"resnet50"`` or the path of a saved ``.keras`` model mapping
            ``(N, H, W, 3)`` to ``(N, D)``.
        weights: ``"imagenet"``, ``"none"`` (random, seeded by ``seed``) or the
            path of a Keras weights file (ResNet50 only, or loaded into the model).
        image_size: input side in pixels.
        cache_dir: Keras cache folder for the ImageNet weights (default ``~/.keras``).
        allow_standin: with ``backbone="resnet50", weights="imagenet"``, fall back to
            ``../shared/models/resnet50_conv4_imagenet.keras`` when the official
            weights are unavailable.
        log: where to say which backbone is used (``None`` for silence).
        pooling: ``"avg"`` (global average pooling, the recipe) or ``"gem"``
            (generalized mean over the same feature map).

    Example:
        >>> model, info = build_backbone(weights="none", image_size=32)  # doctest: +SKIP
        >>> info.feature_dim
        2048
    """
    if pooling not in POOLINGS:
        raise FashionrecError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    model, info = _build_backbone(backbone, weights, image_size, seed, cache_dir,
                                  allow_standin, log)
    if pooling != "avg":
        model = with_pooling(model, pooling, info.model_path or "ResNet50")
        info.pooling = pooling
    (log or (lambda *_: None))(f"backbone: {info.describe()}")
    return model, info


def _build_backbone(backbone, weights, image_size, seed, cache_dir, allow_standin, log):
    say = log or (lambda *_: None)
    if backbone != "resnet50":
        path = Path(backbone)
        if not path.is_file():
            raise FashionrecError(f"backbone file {backbone} does not exist")
        if weights == "none":
            raise FashionrecError("--weights none applies to --backbone resnet50 only")
        model, dim = _load_saved_backbone(path, image_size)
        info = BackboneInfo("custom", "saved-model", dim, image_size,
                            model_path=str(path.resolve()), model_sha256=sha256_file(path))
        if weights != "imagenet":  # a weights file for the saved model
            _load_weights(model, weights, backbone)
            info.weights = "file"
            info.weights_path, info.weights_hash = str(Path(weights).resolve()), sha256_file(weights)
        return model, info

    if weights == "none":
        model = _resnet50(None, image_size, seed)
        info = BackboneInfo("resnet50", "none", 2048, image_size, seed=seed)
    elif weights == "imagenet":
        try:
            path = fetch_imagenet_weights(cache_dir)
        except FashionrecError as exc:
            standin = find_standin() if allow_standin else None
            if standin is None:
                looked = ", ".join(str(s / "models") for s in shared_dirs()) or "no ../shared"
                raise FashionrecError(
                    f"{exc}; no stand-in {STANDIN_NAME} found ({looked}). Ways forward: "
                    f"put {IMAGENET_NOTOP[0]} in ~/.keras/models/, or pass --weights none "
                    f"(random), --weights PATH (a weights file) or --backbone PATH.keras"
                ) from None
            model, dim = _load_saved_backbone(standin, image_size)
            note = (f"official ResNet50 ImageNet weights unavailable ({exc}); using the "
                    f"stage-4 ImageNet ResNet50 stand-in {standin} ({dim}-d) instead")
            say(f"NOTE: {note}")
            info = BackboneInfo("custom", "saved-model", dim, image_size,
                                model_path=str(standin), model_sha256=sha256_file(standin),
                                note=note)
            return model, info
        model = _resnet50(str(path), image_size, seed)
        info = BackboneInfo("resnet50", "imagenet", 2048, image_size,
                            weights_path=str(path), weights_hash=IMAGENET_NOTOP[1])
    else:
        model = _resnet50(str(weights), image_size, seed)
        info = BackboneInfo("resnet50", "file", 2048, image_size,
                            weights_path=str(Path(weights).resolve()),
                            weights_hash=sha256_file(weights))
    return model, info


def rebuild_backbone(info, log=None):
    """Rebuild exactly the backbone described by ``info`` (as saved with a run);
    refuse if a file it came from has changed."""
    if info.backbone == "resnet50":
        if info.weights == "none":
            model = _resnet50(None, info.image_size, info.seed)
        elif info.weights == "imagenet":
            model = _resnet50(str(fetch_imagenet_weights()), info.image_size, 0)
        else:
            model = _resnet50(_check_same_file(info.weights_path, info.weights_hash),
                              info.image_size, 0)
    else:
        model_path = _check_same_file(info.model_path, info.model_sha256)
        model, _ = _load_saved_backbone(Path(model_path), info.image_size)
        if info.weights == "file":
            _load_weights(model, _check_same_file(info.weights_path, info.weights_hash),
                          model_path)
    model = with_pooling(model, info.pooling, info.model_path or "ResNet50")
    if log:
        log(f"backbone: {info.describe()}")
    return model


def _load_weights(model, weights, backbone):
    try:
        model.load_weights(weights)
    except Exception as exc:
        raise FashionrecError(f"cannot load weights {weights} into {backbone}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                              ) from None


def _check_same_file(path, sha256):
    """``path`` if it still holds the file the run was trained with; else a file of the
    same name and SHA-256 in ``../shared/models`` (a run copied to another machine);
    else a one-line error."""
    if Path(path).is_file() and sha256_file(path) == sha256:
        return path
    for shared in shared_dirs():
        other = shared / "models" / Path(path).name
        if other.is_file() and other.resolve() != Path(path).resolve() and \
                sha256_file(other) == sha256:
            return str(other)
    if not Path(path).is_file():
        raise FashionrecError(f"the run's backbone file {path} is gone; restore it or re-train")
    raise FashionrecError(f"the run's backbone file {path} has changed since training; "
                          f"restore it or re-train")


def to_model_input(images, image_size):
    """A batch of images (``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)``, 0-255,
    RGB) resized to ``image_size``, gray turned RGB, and ``preprocess_input`` applied."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    x = np.array(images, dtype=np.float32)  # a copy: preprocess_input works in place
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise FashionrecError(f"images must be (N, H, W[, 1 or 3]), got {np.shape(images)}")
    if x.shape[1:3] != (image_size, image_size):
        x = keras.ops.image.resize(x, (image_size, image_size), interpolation="bilinear")
    if x.shape[-1] == 1:
        x = keras.ops.repeat(x, 3, axis=-1)
    return preprocess_input(x)


class FeatureExtractor:
    """Images in, feature vectors out, one batch at a time.

    Args:
        model: the backbone (``(N, S, S, 3)`` -> ``(N, D)``).
        info: its :class:`BackboneInfo`.
        batch_size: images per backbone call.

    Example:
        >>> ext = FeatureExtractor(*build_backbone(weights="none", image_size=32))  # doctest: +SKIP
        >>> ext.transform(np.zeros((5, 28, 28), np.uint8)).shape                    # doctest: +SKIP
        (5, 2048)
    """

    def __init__(self, model, info, batch_size=32):
        self.model = model
        self.info = info
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one backbone call at a time (threads of a server)

    def iter_batches(self, images, progress=False, desc="extract"):
        """Yield ``(start, features)`` for consecutive batches of ``images``."""
        n = len(images)
        with tqdm(total=n, unit="img", desc=desc, disable=not progress,
                  smoothing=0.1, dynamic_ncols=True) as bar:
            for start in range(0, n, self.batch_size):
                batch = images[start:start + self.batch_size]
                x = to_model_input(batch, self.info.image_size)
                with self._lock:
                    feats = np.asarray(self.model.predict_on_batch(x), dtype=np.float32)
                yield start, feats
                bar.update(len(batch))

    def transform(self, images, progress=False):
        """Features of all ``images`` as a ``(N, D)`` float32 array."""
        out = np.empty((len(images), self.info.feature_dim), dtype=np.float32)
        for start, feats in self.iter_batches(images, progress):
            out[start:start + len(feats)] = feats
        return out

    def transform_to_h5(self, images, path, attrs=None, progress=True, desc="extract"):
        """Stream the features of ``images`` into dataset ``features`` of the HDF5
        file ``path`` (written atomically); memory stays one batch deep."""
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                dset = f.create_dataset("features", (len(images), self.info.feature_dim),
                                        dtype="float32")
                for key, value in (attrs or {}).items():
                    f.attrs[key] = value
                for start, feats in self.iter_batches(images, progress, desc):
                    dset[start:start + len(feats)] = feats
        return Path(path)


def cached_features(extractor, images, cache_dir, name, progress=True, digest=None):
    """Features of ``images``, cached in ``cache_dir/<name>-<fingerprint>.h5``.

    The cache is reused when it was made by the same backbone from the very same
    images (SHA-256 of the pixels, or ``digest``: e.g. of the image files of a lazy
    :class:`~fashionrec.catalog.ImageFiles`), so re-training the head does not re-extract.
    """
    path = Path(cache_dir) / f"{name}-{extractor.info.fingerprint}.h5"
    if digest is None:
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    if path.is_file():
        try:
            with h5py.File(path, "r") as f:
                if (f.attrs.get("fingerprint") == extractor.info.fingerprint
                        and f.attrs.get("images_sha256") == digest
                        and f["features"].shape == (len(images), extractor.info.feature_dim)):
                    return f["features"][:]
        except (OSError, KeyError):
            pass  # unreadable cache: rebuild it below
    extractor.transform_to_h5(
        images, path, progress=progress, desc=f"extract {name}",
        attrs={"fingerprint": extractor.info.fingerprint,
               "backbone": json.dumps(extractor.info.to_dict()),
               "images_sha256": digest},
    )
    with h5py.File(path, "r") as f:
        return f["features"][:]
