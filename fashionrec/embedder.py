"""Stage 4 — the model: the trained two-stage model as one artifact.

An :class:`Embedder` is the backbone (described by its
:class:`~fashionrec.extract.BackboneInfo`, rebuilt on first use), the trained head
(with its feature scaler), the embedding scaler, and the views a product is seen in.
It is the one place where images become standardized vectors::

    images -> backbone features, one array per view -> head: class probabilities and
    the 512-d ``dense_mid`` embedding -> mean over the views -> standardized

It is immutable once trained: fitting, queries, ``add``, a retrain's carry-over,
evaluation and the service all call it. An OpenVINO run loads *lean* (a NumPy head and
the backbone's OpenVINO IR, no TensorFlow: :mod:`fashionrec.lean`).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
from sklearn.preprocessing import StandardScaler

from .artifacts import read_json, scaler_from_arrays, scaler_to_arrays, write_json
from .engine import read_ir, save_ir
from .errors import FashionrecError
from .extract import FeatureExtractor, ViewCache, rebuild_backbone
from .head import ClassifierHead
from .lean import NumpyHead, export_head
from .lean import wanted as lean_wanted

PLAIN = ((None, False),)  # the one view of a dataset run's square gray images


class Embedder:
    """Images in, standardized embeddings and class probabilities out.

    Args:
        info: the backbone's :class:`~fashionrec.extract.BackboneInfo`.
        head: a trained :class:`~fashionrec.head.ClassifierHead` (or its NumPy copy,
            :class:`~fashionrec.lean.NumpyHead`).
        scaler: the fitted StandardScaler of the catalog's embeddings.
        views: ``(fit, mirrored)`` of every view a product photo is seen in
            (:meth:`RunConfig.views`); :data:`PLAIN` for Fashion-MNIST runs.
        batch_size: images per backbone call.
        extractor: an already built :class:`~fashionrec.extract.FeatureExtractor`
            (training has one); else it is built from ``info`` on first use.
        backbone_ir: the backbone's saved OpenVINO IR (``backbone.xml``) to build it
            from, without Keras (an OpenVINO run loaded lean); else it is rebuilt
            from ``info``.

    Example:
        >>> emb = Recommender.load("runs/default").embedder_      # doctest: +SKIP
        >>> probs, vectors = emb.encode_images(images)             # doctest: +SKIP
    """

    def __init__(self, info, head, scaler, views=PLAIN, batch_size=32, extractor=None,
                 backbone_ir=None):
        self.info, self.head, self.scaler = info, head, scaler
        self.views = tuple((f, bool(m)) for f, m in views)
        self.batch_size = batch_size
        self._extractor = extractor
        self.backbone_ir = backbone_ir
        self._lock = threading.Lock()

    @classmethod
    def fit(cls, info, head, catalog_views, views=PLAIN, batch_size=32, extractor=None):
        """The embedder whose scaler standardizes the catalog's embeddings (from its
        backbone features, one array per view), and the catalog's probabilities and
        vectors: ``(embedder, probs, vectors)``."""
        probs, emb = _mean_outputs(head, catalog_views)
        scaler = StandardScaler().fit(np.asarray(emb, dtype=np.float64))
        embedder = cls(info, head, scaler, views, batch_size, extractor)
        return embedder, probs, embedder.standardize(emb)

    @property
    def is_catalog(self):
        """Whether products are photos fitted to a square (not square gray images)."""
        return self.views != PLAIN

    @property
    def image_size(self):
        return self.info.image_size

    # ------------------------------------------------------------ the chain
    def standardize(self, embeddings):
        return self.scaler.transform(
            np.atleast_2d(np.asarray(embeddings, dtype=np.float64))).astype(np.float32)

    def encode_features(self, per_view):
        """``(probs, vectors)`` from backbone features, one ``(N, D)`` array per view."""
        probs, emb = _mean_outputs(self.head, per_view)
        return probs, self.standardize(emb)

    def encode_images(self, images, progress=False):
        """``(probs, vectors)`` of prepared images: ``(N, V, S, S, 3)`` photos in every
        view (:func:`fashionrec.images.image_views`) or ``(N, H, W)`` gray images."""
        return self.encode_features(self.image_features(images, progress))

    def image_features(self, images, progress=False):
        """Backbone features of prepared images, one array per view (one backbone
        pass for every view of the batch)."""
        feats = self.extractor.transform(np.asarray(images), progress)
        if feats.ndim == 2:
            return [feats]
        return [feats[:, v] for v in range(feats.shape[1])]

    @property
    def extractor(self):
        """The feature extractor, built on first use (once, even when several threads
        ask at the same time)."""
        if self._extractor is None:
            with self._lock:
                if self._extractor is None:
                    model = (read_ir(self.backbone_ir, self.info) if self.backbone_ir
                             else rebuild_backbone(self.info))
                    self._extractor = FeatureExtractor(model, self.info, self.batch_size)
        return self._extractor

    # ------------------------------------------------------------ catalog files
    def catalog_features(self, catalog, digest=None, cache_dir=None, progress=True,
                         name="catalog", runner=None):
        """Features of a checked catalog's images in every view, from the feature cache
        when it has them: ``(features per view, failed)``, ``failed`` mapping the rows
        whose image could not be decoded to the reason. Without ``cache_dir`` (``add``)
        they are computed here; ``runner`` (e.g. Ray) computes them into the cache."""
        images = catalog.images(self.image_size, views=list(self.views))
        if cache_dir is None:
            if runner is not None:
                raise FashionrecError("extraction with a runner writes into a feature "
                                      "cache; give a cache folder")
            return self._features_here(catalog, images, progress)
        cache = self.view_cache(cache_dir, digest or catalog.content_digest(), len(catalog),
                                name)
        return cache.extract(self.extractor if runner is None else None, images, progress,
                             desc=f"extract {name}", views=self.views, runner=runner)

    def _features_here(self, catalog, images, progress):
        failed, dim = {}, self.info.feature_dim
        per_view = [np.empty((len(catalog), dim), np.float32) for _ in self.views]
        for start, feats, bad in self.extractor.iter_batches(images, progress):
            failed.update(bad)
            for v, out in enumerate(per_view):
                out[start:start + len(feats)] = feats[:, v]
        return per_view, failed

    def view_cache(self, cache_dir, digest, n, name="catalog"):
        """The feature cache of ``n`` catalog images (content ``digest``) in every view:
        one file per view, named and keyed as catalog runs always were."""
        names, keys = [], []
        for fit, mirror in self.views:
            plain = fit == "pad" and not mirror  # the key catalog runs always had
            tag = f"{fit}{'-mirror' if mirror else ''}"
            names.append(name if plain else f"{name}-{tag}")
            keys.append(digest if plain else
                        hashlib.sha256(f"{digest}\0{tag}".encode()).hexdigest())
        return ViewCache(cache_dir, self.info, names, keys, n)

    # ------------------------------------------------------------ persistence
    def save(self, version, run_id):
        """Write the head (Keras, and its NumPy copy), the embedding scaler and, for an
        OpenVINO run, the backbone as OpenVINO IR into a version folder
        (:class:`~fashionrec.rundir.Version`)."""
        self.head.save(version.head_model, version.head_state, run_id=run_id)
        export_head(self.head, version.head_weights, run_id)
        if self.info.engine == "openvino":
            model = (self._extractor.model if self._extractor is not None
                     else rebuild_backbone(self.info))
            save_ir(model, self.info, version.backbone_ir)
        write_json(version.embedder, {
            "run_id": run_id,
            "scaler": {k: np.asarray(v).tolist() for k, v in scaler_to_arrays(self.scaler).items()}})

    @classmethod
    def load(cls, version, info, views, batch_size, run_id, legacy_scaler=None):
        """The embedder of a version folder; ``legacy_scaler()`` gives the scaler of a run
        saved before ``embedder.json`` existed (it was kept in the index file).

        An OpenVINO run loads lean where its version has the files
        (:func:`fashionrec.lean.wanted`): the NumPy head, and the backbone from its IR;
        a run saved before them loads the Keras head and rebuilds the backbone."""
        lean = lean_wanted(info)
        if lean and version.head_weights.is_file():
            head = NumpyHead.load(version.head_weights, version.head_state)
        else:
            head = ClassifierHead.load(version.head_model, version.head_state)
        if version.embedder.is_file():
            state = read_json(version.embedder, "embedder file")
            try:
                scaler, owner = scaler_from_arrays(state["scaler"]), state.get("run_id")
            except (KeyError, TypeError) as exc:
                raise FashionrecError(f"{version.embedder} is damaged ({exc})") from None
        elif legacy_scaler is not None:
            scaler, owner = legacy_scaler(), run_id
        else:
            raise FashionrecError(f"{version.embedder} does not exist")
        if {head.run_id_, owner} != {run_id}:
            raise FashionrecError(f"{version.folder} mixes files of two runs (an "
                                  f"interrupted save?); re-run `make train`")
        ir = version.backbone_ir if lean and version.backbone_ir.is_file() else None
        return cls(info, head, scaler, views, batch_size, backbone_ir=ir)


def _mean_outputs(head, per_view):
    """Class probabilities and raw 512-d embeddings, each the mean over the views."""
    probs = np.mean([head.predict_proba(v) for v in per_view], axis=0)
    emb = np.mean([head.embed(v) for v in per_view], axis=0)
    return probs, emb
