"""Stage 5 — recommend: the one object users hold.

:class:`Recommender` composes the stages — data, extract, head, index — behind
four verbs: ``fit``, ``save``, ``load`` and ``recommend``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .artifacts import now_iso, package_versions, peak_rss_mb, read_json, write_json
from .config import RunConfig
from .data import Dataset, get_spec, load_dataset, load_split
from .errors import FashionrecError
from .extract import (
    BackboneInfo,
    FeatureExtractor,
    build_backbone,
    cached_features,
    rebuild_backbone,
)
from .head import ClassifierHead
from .index import CatalogIndex

RUN_FILE = "run.json"
INDEX_FILE = "index.h5"


@dataclass
class Item:
    rank: int
    id: int
    label: int
    class_name: str
    distance: float


@dataclass
class Recommendation:
    """A query and its nearest catalog items, nearest first."""

    query: dict
    items: list = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)  # the query as 2-D gray

    def to_dict(self):
        return {"query": self.query, "items": [asdict(i) for i in self.items]}

    def format_text(self):
        q = self.query
        if q["kind"] == "test_index":
            head = f"query: test image {q['test_index']} (true: {q['true_class']}"
            head += f", predicted: {q['predicted_class']} p={q['probability']:.2f})"
        else:
            head = f"query: {q.get('source', 'image')} (predicted: {q['predicted_class']}"
            head += f" p={q['probability']:.2f})"
        lines = [head, f"{'rank':>4}  {'catalog idx':>11}  {'class':<12}  {'distance':>9}"]
        for it in self.items:
            lines.append(f"{it.rank:>4}  {it.id:>11}  {it.class_name:<12}  {it.distance:>9.4f}")
        return "\n".join(lines)


class Recommender:
    """Recommend visually similar products: ResNet50 features -> trained head ->
    standardized 512-d embeddings -> exact Euclidean nearest neighbours.

    Args:
        config: a :class:`RunConfig`; keyword arguments override its fields.

    Example:
        >>> from fashionrec import Recommender
        >>> rec = Recommender(n_train=15000, n_reco=5000).fit(cache_dir="runs/default/features")  # doctest: +SKIP
        >>> rec.save("runs/default")                                         # doctest: +SKIP
        >>> rec = Recommender.load("runs/default")                           # doctest: +SKIP
        >>> [item.id for item in rec.recommend(5033, k=6).items]             # doctest: +SKIP
    """

    def __init__(self, config=None, **overrides):
        base = (config or RunConfig()).to_dict()
        base.update(overrides)
        self.config = RunConfig.from_dict(base)

    # ------------------------------------------------------------------ fit
    def fit(self, dataset=None, cache_dir=None, progress=True, log=print):
        """Run the whole pipeline.

        Args:
            dataset: a :class:`~fashionrec.data.Dataset`; by default the configured
                one is loaded from the first place that has it.
            cache_dir: folder for the HDF5 feature cache (none: no caching).
            progress: show progress bars.
            log: where to report (``None``: silent).
        """
        cfg = self.config
        say = log or (lambda *_: None)
        timings = {}
        t0 = time.perf_counter()
        # The backbone is resolved first, so a missing one stops us before long work.
        model, info = build_backbone(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed,
                                     log=say)
        if dataset is None:
            dataset = load_dataset(cfg.dataset, cfg.data_dir)
        if cfg.n_train > len(dataset.x_train):
            raise FashionrecError(f"n_train {cfg.n_train} exceeds the {len(dataset.x_train)} "
                                  f"training images of {dataset.name}")
        if cfg.n_reco > len(dataset.x_test):
            raise FashionrecError(f"n_reco {cfg.n_reco} exceeds the {len(dataset.x_test)} "
                                  f"test images of {dataset.name}")
        x_train, y_train = dataset.x_train[:cfg.n_train], dataset.y_train[:cfg.n_train]
        x_cat, y_cat = dataset.x_test[:cfg.n_reco], dataset.y_test[:cfg.n_reco]
        timings["setup_s"] = time.perf_counter() - t0

        t = time.perf_counter()
        self.extractor_ = FeatureExtractor(model, info, cfg.extract_batch_size)
        if cache_dir is not None:
            f_train = cached_features(self.extractor_, x_train, cache_dir, "train", progress)
            f_cat = cached_features(self.extractor_, x_cat, cache_dir, "catalog", progress)
        else:
            f_train = self.extractor_.transform(x_train, progress)
            f_cat = self.extractor_.transform(x_cat, progress)
        timings["extract_s"] = time.perf_counter() - t

        t = time.perf_counter()
        say(f"head: training on {len(f_train)} feature vectors for {cfg.epochs} epochs")
        self.head_ = ClassifierHead(
            n_classes=len(dataset.class_names), epochs=cfg.epochs, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, dropout=cfg.dropout,
            validation_split=cfg.validation_split, seed=cfg.seed,
            verbose="auto" if progress else 0,
        ).fit(f_train, y_train)
        timings["head_s"] = time.perf_counter() - t

        t = time.perf_counter()
        accuracy = float(np.mean(self.head_.predict(f_cat) == y_cat))
        self.run_id_ = uuid.uuid4().hex
        self.metadata_ = {
            "run_id": self.run_id_,
            "fashionrec_version": __version__,
            "created": now_iso(),
            "versions": package_versions(),
            "config": cfg.to_dict(),
            "backbone": info.to_dict(),
            "backbone_description": info.describe(),
            "dataset": {
                "name": dataset.name,
                "source": dataset.source,
                "class_names": list(dataset.class_names),
                "image_shape": list(dataset.x_test.shape[1:]),
                "n_train": int(cfg.n_train),
                "n_reco": int(cfg.n_reco),
                "catalog": f"first {cfg.n_reco} test images",
            },
            "head_test_accuracy": accuracy,
        }
        self.index_ = CatalogIndex.build(
            self.head_.embed(f_cat), ids=np.arange(cfg.n_reco), labels=y_cat,
            class_names=dataset.class_names, images=x_cat, metadata=self.metadata_,
        )
        timings["index_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        timings["peak_rss_mb"] = peak_rss_mb()
        self.metadata_["timings"] = timings
        self._dataset = dataset
        say(f"head test accuracy on the {cfg.n_reco} catalog images: {accuracy:.4f}")
        return self

    # ------------------------------------------------------------ save/load
    def _check_fitted(self):
        if not hasattr(self, "index_"):
            raise FashionrecError("this Recommender is not trained; call fit() or load()")

    def save(self, run_dir):
        """Write the head, the index and ``run.json`` (last) under ``run_dir``.

        Each file is written atomically and all carry the same run id, so a
        save interrupted half-way is detected by :meth:`load`.
        """
        self._check_fitted()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.head_.save(run_dir, run_id=self.run_id_)
        self.index_.save(run_dir / INDEX_FILE)
        write_json(run_dir / RUN_FILE, self.metadata_)
        return run_dir

    @classmethod
    def load(cls, run_dir):
        """Load a run saved by :meth:`save`, in this or any other process."""
        run_dir = Path(run_dir)
        if not (run_dir / RUN_FILE).is_file():
            raise FashionrecError(f"no trained run in {run_dir}; run `make train` first")
        meta = read_json(run_dir / RUN_FILE, "run file")
        try:
            rec = cls(RunConfig.from_dict(meta["config"]))
            info = BackboneInfo.from_dict(meta["backbone"])
        except (KeyError, TypeError) as exc:
            raise FashionrecError(f"{run_dir / RUN_FILE} is not a fashionrec run ({exc})") from None
        rec.metadata_ = meta
        rec.run_id_ = meta.get("run_id")
        rec.head_ = ClassifierHead.load(run_dir)
        rec.index_ = CatalogIndex.load(run_dir / INDEX_FILE)
        if not rec.run_id_ or {rec.head_.run_id_, rec.index_.metadata.get("run_id")} != {
                rec.run_id_}:
            raise FashionrecError(
                f"{run_dir} mixes files of two runs (an interrupted save?); re-run `make train`")
        rec._backbone_info = info
        return rec

    # ------------------------------------------------------------ recommend
    @property
    def extractor(self):
        if not hasattr(self, "extractor_"):
            model = rebuild_backbone(self._backbone_info)
            self.extractor_ = FeatureExtractor(model, self._backbone_info,
                                               self.config.extract_batch_size)
        return self.extractor_

    @property
    def class_names(self):
        return self.index_.class_names

    def test_images(self):
        """Images and labels of the test split the run was trained with."""
        if getattr(self, "_dataset", None) is None:
            cfg = self.config
            x, y, folder = load_split(cfg.dataset, "test", cfg.data_dir)
            n = len(self.index_)
            if self.index_.images is not None and not (
                    len(x) >= n and np.array_equal(x[:n], self.index_.images)):
                raise FashionrecError(
                    f"the {cfg.dataset} test split in {folder} is not the one this run's "
                    f"catalog was made from; query by image instead")
            self._dataset = Dataset(cfg.dataset, None, None, x, y, get_spec(cfg.dataset).class_names)
        return self._dataset.x_test, self._dataset.y_test

    def query_image(self, query):
        """The 2-D image a query stands for, and a dict describing the query."""
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            x_test, y_test = self.test_images()
            if not 0 <= int(query) < len(x_test):
                raise FashionrecError(
                    f"test index {int(query)} is out of range 0..{len(x_test) - 1}")
            label = int(y_test[query])
            return x_test[int(query)], {"kind": "test_index", "test_index": int(query),
                                        "true_label": label,
                                        "true_class": self.class_names[label]}
        if isinstance(query, (str, Path)):
            return load_image(query, self._image_shape()), {"kind": "file", "source": str(query)}
        if isinstance(query, np.ndarray):
            return to_gray(query, self._image_shape()), {"kind": "array", "source": "array"}
        raise FashionrecError(
            f"a query is a test index, an image path or an image array, not {type(query).__name__}")

    def _image_shape(self):
        return tuple(self.metadata_["dataset"].get("image_shape", (28, 28)))[:2]

    def recommend(self, query, k=6):
        """The ``k`` catalog items nearest to ``query``.

        Args:
            query: a test-split index (``int``), an image file path, or an image array
                (``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``, values 0-255).
            k: how many items.

        A query that is itself in the catalog never gets itself back.
        """
        self._check_fitted()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise FashionrecError(f"k must be a positive integer, got {k!r}")
        if k > len(self.index_) - 1:
            raise FashionrecError(f"k={k} is more than the catalog's {len(self.index_) - 1} "
                                  f"other items")
        image, info = self.query_image(query)
        feats = self.extractor.transform(image[None])
        probs = self.head_.predict_proba(feats)[0]
        pred = int(probs.argmax())
        info.update(predicted_label=pred, predicted_class=self.class_names[pred],
                    probability=float(probs[pred]))
        vector = self.index_.transform(self.head_.embed(feats))
        exclude = [info["test_index"]] if info["kind"] == "test_index" else None
        rows, dists = self.index_.search(vector, k, exclude_ids=exclude)
        items = [
            Item(rank=r + 1, id=int(self.index_.ids[row]), label=int(self.index_.labels[row]),
                 class_name=self.class_names[int(self.index_.labels[row])],
                 distance=float(d))
            for r, (row, d) in enumerate(zip(rows[0], dists[0], strict=True))
        ]
        return Recommendation(query=info, items=items, image=image)


def to_gray(image, shape):
    """An image array as ``shape``-sized gray uint8-range float32."""
    import keras

    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 3 and x.shape[-1] in (3, 4):
        x = x[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if x.ndim != 2 or min(x.shape) < 1:
        raise FashionrecError(f"an image array must be (H, W), (H, W, 1) or (H, W, 3), "
                              f"got {np.shape(image)}")
    if not np.isfinite(x).all():
        raise FashionrecError("the image array has NaN or infinite values")
    if tuple(x.shape) != tuple(shape):
        x = np.asarray(keras.ops.image.resize(x[..., None], shape))[..., 0]
    return np.clip(x, 0, 255)


def load_image(path, shape):
    """Read an image file as gray ``shape``-sized array (values 0-255)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("L").resize(tuple(reversed(shape)), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise FashionrecError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FashionrecError(f"cannot read image {path} ({exc})") from None
