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

from .artifacts import atomic_path, file_digest, flocked, sha256_file, short_reason
from .config import POOLINGS, shared_dirs
from .errors import FashionrecError
from .images import model_batch

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
    engine: str = "keras"  # what runs the backbone: "keras" or "openvino"
    precision: str = "float32"  # "float32" or "bfloat16"
    engine_version: str | None = None  # e.g. OpenVINO's version (not part of the key)

    @property
    def fingerprint(self):
        """A short id of the function images -> features (for caches)."""
        key = [self.backbone, self.weights, self.model_sha256 or self.weights_hash,
               self.seed, self.image_size, self.feature_dim]
        if self.model_sha256 and self.weights_hash:
            key.append(self.weights_hash)
        if self.pooling != "avg":  # average-pooled runs keep the fingerprint they had
            key.append(self.pooling)
        if (self.engine, self.precision) != ("keras", "float32"):  # so do Keras float32 ones
            key += [self.engine, self.precision]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def describe(self, public=False):
        """One line; ``public``: without file paths (for answers to strangers)."""
        what = "ResNet50" if self.backbone == "resnet50" else (
            "a saved backbone" if public else f"backbone {self.model_path}")
        weights = {
            "imagenet": "ImageNet weights",
            "none": f"random weights (seed {self.seed})",
            "file": "weights from a file" if public else f"weights from {self.weights_path}",
            "saved-model": "weights saved in the model",
        }[self.weights]
        pooled = ", GeM-pooled (p=3)" if self.pooling == "gem" else ""
        return f"{what}, {weights}, {self.feature_dim}-d features{pooled} at {self.image_size} px"

    def describe_engine(self):
        name = {"keras": "Keras", "openvino": "OpenVINO"}.get(self.engine, self.engine)
        return f"{name} {self.precision}"

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


_SEEDED = threading.Lock()  # Keras's seed is global: one seeded build at a time


def _resnet50(weights, image_size, seed):
    import keras

    try:
        with _SEEDED:  # two threads building at once would interleave their random draws
            keras.utils.set_random_seed(seed)
            return keras.applications.ResNet50(
                include_top=False, pooling="avg", weights=weights,
                input_shape=(image_size, image_size, 3),
            )
    except (ValueError, OSError) as exc:
        raise FashionrecError(
            f"cannot load ResNet50 weights from {weights}: {str(exc).splitlines()[0]}"
        ) from None


def build_backbone(backbone="resnet50", weights="imagenet", image_size=224, seed=1234,
                   cache_dir=None, allow_standin=True, log=print, pooling="avg",
                   engine="keras", precision="float32"):
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
        engine, precision: what runs the backbone (:func:`fashionrec.engine.resolve`:
            ``"auto"`` picks for this machine); recorded in the info, which
            :class:`FeatureExtractor` follows.

    Example:
        >>> model, info = build_backbone(weights="none", image_size=32)  # doctest: +SKIP
        >>> info.feature_dim
        2048
    """
    from .engine import openvino_version, resolve

    if pooling not in POOLINGS:
        raise FashionrecError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    engine, precision, why = resolve(engine, precision)  # a bad choice stops us first
    model, info = _build_backbone(backbone, weights, image_size, seed, cache_dir,
                                  allow_standin, log)
    if pooling != "avg":
        model = with_pooling(model, pooling, info.model_path or "ResNet50")
        info.pooling = pooling
    info.engine, info.precision = engine, precision
    info.engine_version = openvino_version() if engine == "openvino" else None
    say = log or (lambda *_: None)
    say(f"backbone: {info.describe()}")
    say(f"engine: {info.describe_engine()} ({why})")
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


IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)  # ResNet50's "caffe" preprocessing


def to_model_input(images, image_size):
    """A batch of images (``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)``, 0-255,
    RGB) resized to ``image_size``, gray turned RGB (:func:`~fashionrec.images.model_batch`),
    and ResNet50's ``preprocess_input`` applied (:func:`preprocess_input`)."""
    x = model_batch(images, image_size)  # a new array: preprocess_input works in place
    # contiguous here (preprocess_input's RGB -> BGR is a reversed view), so the copy is
    # made in the decoding threads, not on the engine's critical path
    return np.ascontiguousarray(preprocess_input(x))


def preprocess_input(x):
    """``keras.applications.resnet50.preprocess_input`` of a float32 channels-last
    batch, in NumPy (no Keras import): RGB to BGR, then each channel less its ImageNet
    mean, the same operations in the same order (bit for bit the same). Works in place
    and returns a reversed view, as Keras does."""
    x = x[..., ::-1]
    for c, mean in enumerate(IMAGENET_BGR_MEAN):
        x[..., c] -= mean
    return x


def prefetch(jobs, workers=2, depth=4):
    """Run the callables ``jobs`` in ``workers`` background threads, at most ``depth``
    ahead of the consumer (memory stays flat), and yield their results in order. An
    exception in a job is raised here, at its turn; closing the generator early stops
    the jobs not yet started. ``workers=0`` runs them here, one by one."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if workers == 0:
        for job in jobs:
            yield job()
        return
    jobs = iter(jobs)
    pending = deque()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fashionrec-decode") as pool:
        try:
            for job in jobs:
                pending.append(pool.submit(job))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def items_per_call(batch_size, views=1):
    """Items in one backbone call of ``batch_size`` inputs when each item is seen in
    ``views`` views (at least one): the grid every extraction, local or on Ray, cuts on."""
    return max(1, batch_size // views)


def decode_workers():
    """Background decoding threads: the machine's cores, at most 8 (image decoding
    and resizing release the GIL)."""
    return max(1, min(8, os.cpu_count() or 1))


class FeatureExtractor:
    """Images in, feature vectors out, one batch at a time.

    The next batches are decoded, fitted and preprocessed in background threads
    (:func:`prefetch`) while the engine computes the current one.

    Args:
        model: the backbone (``(N, S, S, 3)`` -> ``(N, D)``).
        info: its :class:`BackboneInfo`; ``info.engine`` and ``info.precision`` say
            what runs it (:mod:`fashionrec.engine`).
        batch_size: images per backbone call.
        workers: background decoding threads (default: :func:`decode_workers`).

    Example:
        >>> ext = FeatureExtractor(*build_backbone(weights="none", image_size=32))  # doctest: +SKIP
        >>> ext.transform(np.zeros((5, 28, 28), np.uint8)).shape                    # doctest: +SKIP
        (5, 2048)
    """

    def __init__(self, model, info, batch_size=32, workers=None):
        from .engine import make_engine

        self.model = model
        self.info = info
        self.batch_size = batch_size
        self.workers = decode_workers() if workers is None else workers
        self.engine = make_engine(model, info.engine, info.precision, info.image_size)

    def _batches(self, images, skip=None):
        """``(start, stop)`` of each batch to compute (``skip``: rows already done); a
        batch holds ``batch_size`` backbone inputs, so fewer items when each has views."""
        shape = images.shape if hasattr(images, "shape") else np.shape(images)
        step = items_per_call(self.batch_size, shape[1] if len(shape) == 5 else 1)
        for start in range(0, len(images), step):
            stop = min(start + step, len(images))
            if skip is None or not skip[start:stop].all():
                yield start, stop

    def iter_batches(self, images, progress=False, desc="extract", skip=None):
        """Yield ``(start, features, failed)`` for consecutive batches of ``images``.

        ``images``: an ``(N, H, W[, C])`` array, or a lazy one such as
        :class:`~fashionrec.images.ImageFiles` (with views: ``(N, V, S, S, 3)``, and
        features ``(n, V, D)``). ``failed`` maps rows whose file could not be decoded
        to the reason (their features are meaningless). ``skip``: a boolean mask of rows
        already done (a resumed extraction); batches entirely done are not computed.
        """
        batches = list(self._batches(images, skip))
        load = getattr(images, "load", None)
        size = self.info.image_size

        def job(start, stop):
            if load is not None:
                x, failed = load(start, stop)
            else:
                x, failed = images[start:stop], {}
            shape = np.shape(x)
            if len(shape) == 5:  # views: one backbone input per view
                x = np.reshape(x, (-1, *shape[2:]))
            return start, to_model_input(x, size), shape, failed

        total = sum(stop - start for start, stop in batches)
        with tqdm(total=total, unit="img", desc=desc, disable=not progress,
                  smoothing=0.1, dynamic_ncols=True) as bar:
            workers = self.workers if len(batches) > 1 else 0  # one batch (a query): no threads
            prepared = prefetch((lambda b=b: job(*b) for b in batches), workers,
                                depth=2 * self.workers)
            for (start, shape, failed), feats in self.engine.map(
                    ((start, shape, failed), x) for start, x, shape, failed in prepared):
                if len(shape) == 5:
                    feats = feats.reshape(shape[0], shape[1], -1)
                yield start, feats, failed
                bar.update(shape[0])

    def transform(self, images, progress=False):
        """Features of all ``images`` as a ``(N, D)`` float32 array (``(N, V, D)`` for
        images with views). An unreadable file raises its one-line error."""
        out = None
        for start, feats, failed in self.iter_batches(images, progress):
            if failed:
                raise FashionrecError(next(iter(failed.values())))
            if out is None:
                out = np.empty((len(images), *feats.shape[1:]), dtype=np.float32)
            out[start:start + len(feats)] = feats
        if out is None:
            out = np.empty((0, self.info.feature_dim), dtype=np.float32)
        return out

    def transform_to_h5(self, images, path, attrs=None, progress=True, desc="extract"):
        """Stream the features of ``images`` into dataset ``features`` of the HDF5
        file ``path`` (written atomically); memory stays a few batches deep."""
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                dset = f.create_dataset("features", (len(images), self.info.feature_dim),
                                        dtype="float32")
                for key, value in (attrs or {}).items():
                    f.attrs[key] = value
                for start, feats, failed in self.iter_batches(images, progress, desc):
                    if failed:
                        raise FashionrecError(next(iter(failed.values())))
                    dset[start:start + len(feats)] = feats
        return Path(path)


def cached_features(extractor, images, cache_dir, name, progress=True, digest=None):
    """Features of ``images``, cached in ``cache_dir/<name>-<fingerprint>.h5``.

    The cache is reused when it was made by the same backbone and engine from the very
    same images (SHA-256 of the pixels, or ``digest``), so re-training the head does
    not re-extract.
    """
    if digest is None:
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    cache = ViewCache(cache_dir, extractor.info, [name], [digest], len(images))
    views, _ = cache.extract(extractor, images, progress, desc=f"extract {name}")
    return views[0]


class ViewCache:
    """The feature cache of one image list seen in one or more views: one HDF5 file per
    view, ``<name>-<fingerprint>.h5`` in ``cache_dir``, each with its own key.

    Missing views are extracted together (each image decoded once for all of them)
    into ``<first missing name>-<fingerprint>.partial.h5``, which records which rows
    are done after every batch: a killed extraction resumes where it stopped. When all
    rows are done the view files are written (each atomically) and the partial file
    removed. Rows whose image could not be decoded are recorded (attribute ``failed``)
    and come back from :meth:`extract` beside the features. One process at a time
    writes a partial file (it holds ``<...>.partial.lock``); a second extraction of the
    same images stops with a one-line error instead of taking the file over.

    Args:
        cache_dir: the folder.
        info: the :class:`BackboneInfo` (its fingerprint is part of every name and key).
        names: one file name stem per view.
        keys: one content key per view (e.g. the SHA-256 of the images and the view).
        n: the number of images.
    """

    def __init__(self, cache_dir, info, names, keys, n):
        self.cache_dir = Path(cache_dir)
        self.info = info
        self.names, self.keys, self.n = list(names), list(keys), int(n)
        fp = info.fingerprint
        self.paths = [self.cache_dir / f"{name}-{fp}.h5" for name in self.names]

    def _read(self, path, key):
        try:
            with h5py.File(path, "r") as f:
                if (f.attrs.get("fingerprint") == self.info.fingerprint
                        and f.attrs.get("images_sha256") == key
                        and f["features"].shape == (self.n, self.info.feature_dim)):
                    failed = json.loads(f.attrs.get("failed", "{}"))
                    return f["features"][:], {int(r): why for r, why in failed.items()}
        except (OSError, KeyError, ValueError):
            pass  # unreadable or foreign: extracted again
        return None

    def _read_views(self):
        """Each view's ``(features, failed)`` from its file, ``None`` where not (validly)
        cached: every file read once."""
        return [self._read(p, k) if p.is_file() else None
                for p, k in zip(self.paths, self.keys, strict=True)]

    def load(self):
        """``(features per view, failed rows)`` if every view is cached, else ``None``."""
        got = self._read_views()
        if any(g is None for g in got):
            return None
        return [g[0] for g in got], got[0][1]

    def partial_path(self, views):
        return self.paths[views[0]].with_suffix(".partial.h5")

    def _busy(self, path):
        return (f"the feature cache {path} is being written by another process; wait for "
                f"it or use another --run-dir")

    def open_partial(self, views):
        """The partial file for ``views`` (created, or reopened to resume when it was
        made for the same keys), open for writing. Call it holding the partial file's
        lock (:meth:`extract` does): a file that opens but is foreign, or that does not
        open as HDF5 at all (cut short by a kill), is replaced; one that HDF5 finds
        locked by another process is left alone."""
        path = self.partial_path(views)
        tag = json.dumps([self.keys[v] for v in views] + [self.info.fingerprint, self.n])
        if path.is_file():
            try:
                f = h5py.File(path, "r+")
            except BlockingIOError:  # HDF5's own lock: another process has it open
                raise FashionrecError(self._busy(path)) from None
            except OSError:
                f = None  # not HDF5 (a file cut short by a kill mid-write): start again
            if f is not None:
                try:
                    if f.attrs.get("key") == tag and f["features"].shape == (
                            self.n, len(views), self.info.feature_dim):
                        return f
                except KeyError:
                    pass  # a foreign file: start again
                f.close()
            path.unlink()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        f = h5py.File(path, "w")
        f.attrs["key"] = tag
        f.attrs["failed"] = "{}"
        # an empty image list gets a contiguous (0, V, D) dataset: no chunk fits in it
        chunks = (min(self.n, 256), 1, self.info.feature_dim) if self.n else None
        f.create_dataset("features", (self.n, len(views), self.info.feature_dim),
                         dtype="float32", chunks=chunks)
        f.create_dataset("done", (self.n,), dtype=bool, fillvalue=False)
        return f

    @staticmethod
    def write_rows(partial, start, feats, failed):
        """Rows ``start:start+len(feats)`` of an open partial file (``feats``
        ``(n, V, D)``), then marked done."""
        partial["features"][start:start + len(feats)] = feats
        if failed:
            known = json.loads(partial.attrs["failed"])
            known.update({str(r): why for r, why in failed.items()})
            partial.attrs["failed"] = json.dumps(known)
        partial["done"][start:start + len(feats)] = True
        partial.flush()

    def publish(self, partial, views):
        """Write the view files from a complete partial file and remove it."""
        failed = partial.attrs["failed"]
        for j, v in enumerate(views):
            with atomic_path(self.paths[v]) as tmp, h5py.File(tmp, "w") as out:
                out.create_dataset("features", data=partial["features"][:, j, :])
                out.attrs.update({"fingerprint": self.info.fingerprint,
                                  "backbone": json.dumps(self.info.to_dict()),
                                  "images_sha256": self.keys[v], "failed": failed})
        path = Path(partial.filename)
        partial.close()
        path.unlink()

    def extract(self, extractor, images, progress=True, desc="extract", views=None,
                runner=None):
        """``(features per view, failed rows)``: from the cache, else extracted by
        ``extractor`` from ``images`` (lazy, ``(N, V, S, S, 3)`` with ``views`` set to
        the view of each position, or ``(N, ...)`` for a single view) and cached.

        ``runner``: what computes the missing rows instead of ``extractor``: an object
        with ``iter_batches(images, progress, desc, skip)`` yielding ``(start, features,
        failed)`` like :meth:`FeatureExtractor.iter_batches`, in any order (e.g.
        :class:`fashionrec.distributed.RayExtractor`)."""
        got = self._read_views()
        todo = [v for v, g in enumerate(got) if g is None]
        if not todo:
            return [g[0] for g in got], got[0][1]
        if views is not None and len(todo) < len(self.paths):
            images = images.only_views(todo)  # decode once, for the missing views only
        path = self.partial_path(todo)
        # one writer per partial file: a second extraction of the same run stops here
        with flocked(path.with_suffix(".lock"), wait=0, busy=self._busy(path)):
            if not all(self.paths[v].is_file() and self._read(self.paths[v], self.keys[v])
                       is not None for v in todo):  # else written by another since we looked
                self._fill(todo, extractor, images, progress, desc, runner)
        for v in todo:  # only the files just written are read back
            got[v] = self._read(self.paths[v], self.keys[v])
        return [g[0] for g in got], got[0][1]

    def _fill(self, todo, extractor, images, progress, desc, runner):
        """Extract the views ``todo`` through their partial file (resumed where an
        earlier run stopped) and publish them."""
        partial = self.open_partial(todo)
        try:
            done = partial["done"][:]
            if done.any():
                tqdm.write(f"{desc}: resuming, {int(done.sum())} of {self.n} images done")
            source = extractor if runner is None else runner
            for start, feats, failed in source.iter_batches(images, progress, desc, skip=done):
                if feats.ndim == 2:
                    feats = feats[:, None, :]
                self.write_rows(partial, start, feats, failed)
            self.publish(partial, todo)
        finally:
            if partial.id.valid:
                partial.close()
