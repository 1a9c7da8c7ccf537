"""Stage 5 — recommend: the one object users hold.

:class:`Recommender` composes the stages — data (or catalog), extract, head,
index — behind a few verbs: ``fit`` (Fashion-MNIST) or ``fit_catalog`` (your own
product images), ``save``, ``load``, ``recommend``, and ``add`` / ``remove`` for a
living catalog.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, search
from .artifacts import now_iso, package_versions, peak_rss_mb, read_json, write_json
from .catalog import (
    Catalog,
    CatalogSplit,
    assign_splits,
    category_matches,
    decode_image,
    fit_views,
    format_report,
    open_image,
    pil_from_array,
    read_image,
)
from .config import RunConfig
from .data import Dataset, get_spec, load_dataset, load_split
from .errors import FashionrecError
from .extract import (
    BackboneInfo,
    FeatureExtractor,
    ViewCache,
    build_backbone,
    cached_features,
    rebuild_backbone,
)
from .head import ClassifierHead
from .index import CatalogIndex
from .store import IndexStore

RUN_FILE = "run.json"
INDEX_FILE = "index.h5"
REPORT_FILE = "catalog_report.json"
SPLIT_FILE = "split.json"
DISPLAY_SIZE = 160  # product thumbnails in result grids


def _stderr(message):
    print(message, file=sys.stderr)


@dataclass
class Item:
    """One recommended catalog item."""

    rank: int
    id: int | str  # a test-split index (Fashion-MNIST) or a product id
    label: int
    class_name: str
    distance: float
    category: str | None = None
    path: str | None = None  # the product's image file, for file catalogs


@dataclass
class Recommendation:
    """A query and its nearest catalog items, nearest first."""

    query: dict
    items: list = field(default_factory=list)
    # the query image: 2-D gray (Fashion-MNIST) or (H, W, 3) RGB (a product catalog)
    image: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self):
        return {"query": self.query,
                "items": [{k: v for k, v in vars(i).items() if v is not None}
                          for i in self.items]}

    def format_text(self):
        q = self.query
        if q["kind"] == "test_index":
            head = f"query: test image {q['test_index']} (true: {q['true_class']}"
            head += f", predicted: {q['predicted_class']} p={q['probability']:.2f})"
        elif q["kind"] == "item":
            head = f"query: catalog item {q['id']} ({q['true_class']}, category {q['category']})"
        else:
            head = f"query: {q.get('source', 'image')} (predicted: {q['predicted_class']}"
            head += f" p={q['probability']:.2f})"
        if q.get("filter"):
            head += f"\nonly: {q['filter']} ({q['n_candidates']} candidates)"
        id_title = "catalog idx" if all(isinstance(i.id, int) for i in self.items) else "item id"
        width = max([len(id_title)] + [len(str(i.id)) for i in self.items])
        cwidth = max([12] + [len(i.class_name) for i in self.items])
        lines = [head, f"{'rank':>4}  {id_title:>{width}}  {'class':<{cwidth}}  {'distance':>9}"]
        for it in self.items:
            lines.append(f"{it.rank:>4}  {it.id!s:>{width}}  {it.class_name:<{cwidth}}  "
                         f"{it.distance:>9.4f}")
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

    lock_wait = 0.0  # seconds add/remove wait while another process updates the index

    def __init__(self, config=None, **overrides):
        if config is not None and not overrides:
            self.config = config  # validated when it was made
        else:
            base = (config or RunConfig()).to_dict()
            base.update(overrides)
            self.config = RunConfig.from_dict(base)
        self._lock = threading.Lock()

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
        if self.config.flip or self.config.image_fit:
            raise FashionrecError("flip and image_fit are for product-catalog runs "
                                  "(fit_catalog); Fashion-MNIST images are square")
        self.config = self.config.resolved(catalog=False)
        cfg = self.config
        say = log or (lambda *_: None)
        timings = {}
        t0 = time.perf_counter()
        # The backbone is resolved first, so a missing one stops us before long work.
        model, info = build_backbone(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed,
                                     log=say, pooling=cfg.pooling, engine=cfg.engine,
                                     precision=cfg.precision)
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
        self.head_ = self._new_head(len(dataset.class_names), progress).fit(f_train, y_train)
        timings["head_s"] = time.perf_counter() - t

        t = time.perf_counter()
        accuracy = float(np.mean(self.head_.predict(f_cat) == y_cat))
        dataset_meta = {
            "name": dataset.name,
            "kind": "dataset",
            "n_test": int(len(dataset.x_test)),
            "source": dataset.source,
            "class_names": list(dataset.class_names),
            "image_shape": list(dataset.x_test.shape[1:]),
            "n_train": int(cfg.n_train),
            "n_reco": int(cfg.n_reco),
            "catalog": f"first {cfg.n_reco} test images",
        }
        self._finish(info, dataset_meta, {"head_test_accuracy": accuracy},
                     dict(embeddings=self.head_.embed(f_cat), ids=np.arange(cfg.n_reco),
                          labels=y_cat, class_names=dataset.class_names, images=x_cat),
                     timings, t0, t, progress, say)
        self._dataset = dataset
        say(f"head test accuracy on the {cfg.n_reco} catalog images: {accuracy:.4f}")
        return self

    def extract_catalog(self, catalog, min_class_size=5, cache_dir=None, progress=True,
                        log=print, runner=None):
        """The feature extraction of :meth:`fit_catalog` alone: the backbone features of
        every view of the catalog's images, into ``cache_dir``, so that
        :meth:`fit_catalog` with the same settings and ``cache_dir`` does not extract
        again. ``runner`` computes them instead of this process (e.g.
        :class:`fashionrec.distributed.RayExtractor`, across machines); rows already
        in the cache's partial file (a killed extraction) are not computed again.

        Returns:
            ``{"n_items", "n_failed", "failed", "files"}``: items extracted, the rows
            whose image could not be decoded (id -> reason), the cache files.
        """
        say = log or (lambda *_: None)
        listed, _, failed, info = self._extract_catalog(catalog, min_class_size, cache_dir,
                                                        progress, say, {}, runner)
        cache = self._view_cache(cache_dir, info, listed.content_digest(), len(listed))
        return {"n_items": len(listed), "n_failed": len(failed),
                "failed": {listed.ids[r]: why for r, why in sorted(failed.items())},
                "files": [p.name for p in cache.paths]}

    def _extract_catalog(self, catalog, min_class_size, cache_dir, progress, say, timings,
                         runner=None):
        """Backbone, header check and features of every view: ``(listed catalog,
        features per view, failed rows, backbone info)``; sets :attr:`report_`,
        :attr:`config` (resolved for a catalog) and, without a runner,
        :attr:`extractor_`."""
        t0 = time.perf_counter()
        cfg = self.config
        model, info = build_backbone(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed,
                                     log=say, pooling=cfg.resolved(catalog=True).pooling,
                                     engine=cfg.engine, precision=cfg.precision)
        if any(label is None for label in catalog.labels):
            raise FashionrecError("every catalog item needs a class to train on")
        # headers only: each image is decoded once, by the extractor's background workers
        listed, self.report_ = catalog.check(min_class_size, progress, decode=False)
        self.config = RunConfig.from_dict({
            **cfg.resolved(catalog=True).to_dict(), "dataset": "catalog", "data_dir": None})
        timings["setup_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        if runner is None:
            self.extractor_ = FeatureExtractor(model, info, self.config.extract_batch_size)
        else:
            runner.prepare(info, self.config.extract_batch_size)
        views, failed = self._catalog_features(listed, listed.content_digest(), cache_dir,
                                               progress, runner=runner, info=info)
        timings["extract_s"] = time.perf_counter() - t
        return listed, views, failed, info

    def fit_catalog(self, catalog, min_class_size=5, holdout=None, cache_dir=None,
                    progress=True, log=print):
        """Train on your own products and index them all.

        Which products train the head: a catalog in split folders trains on ``train/``,
        takes the validation curve from ``validation/`` and holds ``test/`` out; else
        ``holdout`` (a share, e.g. 0.2: seeded, stratified by class) is held out and
        the rest trains, a random ``validation_split`` of it giving the curve. Held-out
        products never reach training but are indexed like every other (a shop
        recommends them all); ``split.json`` records which they are, and
        :func:`fashionrec.evaluate.evaluate` queries with them. Unreadable files and
        classes with fewer than ``min_class_size`` images are left out and listed in
        :attr:`report_`.

        Args:
            catalog: a :class:`~fashionrec.catalog.Catalog` (image folder or CSV).
            min_class_size: smallest class kept.
            holdout: share of products held out of training (catalogs without split
                folders); ``None``: every product trains.
            cache_dir, progress, log: as for :meth:`fit`.

        Example:
            >>> cat = Catalog.read("data/demo-catalog/folder", label_depth=2)   # doctest: +SKIP
            >>> rec = Recommender(image_size=64).fit_catalog(cat, holdout=0.2)  # doctest: +SKIP
            >>> rec.recommend(item="Footwear/Boots/ankle-boot-0003.jpg")       # doctest: +SKIP
        """
        say = log or (lambda *_: None)
        timings = {}
        t0 = time.perf_counter()
        cfg = self.config
        if catalog.splits is not None and holdout:
            assign_splits(catalog, holdout)  # the one-line refusal, before any long work
        listed, views, failed, info = self._extract_catalog(
            catalog, min_class_size, cache_dir, progress, say, timings)
        features_key = listed.content_digest()
        clean, self.report_ = listed.drop_failed(failed, self.report_)
        ok = np.array([i for i in range(len(listed)) if i not in failed], dtype=np.int64)
        views = [v[ok] for v in views] if failed else views
        say(format_report(self.report_, max_listed=5))
        class_names = tuple(c for c, n in self.report_["class_counts"].items() if n)
        if len(class_names) < 2:
            raise FashionrecError(f"the catalog has {len(class_names)} usable class(es); "
                                  f"training needs at least 2 (see the report above)")
        y = np.array([class_names.index(label) for label in clean.labels], dtype=np.int64)
        roles = assign_splits(clean, holdout, cfg.seed)
        fit_roles = ["train"] + (["validation"] if cfg.train_on == "train+validation" else [])
        if cfg.train_on != "train" and not (roles == "validation").any():
            raise FashionrecError("train_on train+validation needs a validation split "
                                  "(split folders with validation/ or val/)")
        train = np.flatnonzero(np.isin(roles, fit_roles))
        if len(np.unique(y[train])) < 2:
            raise FashionrecError("the products left to train on cover fewer than 2 classes")
        self.split_ = CatalogSplit.from_roles(clean.ids, roles, holdout, cfg.seed,
                                              split_folders=clean.splits is not None)
        split = self.split_.summary(len(clean))
        if split["method"] != "none" and cfg.train_on == "train":
            say(f"split ({split['method']}): {split['train']} products train the head, "
                f"{split['validation']} validate it, {split['heldout']} are held out "
                f"(all {len(clean)} are indexed)")
        elif split["method"] != "none":
            say(f"split ({split['method']}): {len(train)} products of train and validation "
                f"train the head, {split['heldout']} are held out (all {len(clean)} are "
                f"indexed)")
        self.config = RunConfig.from_dict({
            **self.config.to_dict(), "n_train": len(train), "n_reco": len(clean)})
        cfg = self.config
        digest = clean.content_digest()

        t = time.perf_counter()
        order = train[np.random.default_rng(cfg.seed).permutation(len(train))]
        val = np.flatnonzero(roles == "validation") if cfg.train_on == "train" else []
        # every view of a product (mirrored, cropped) is one more example to learn from
        mix = np.random.default_rng(cfg.seed + 1).permutation(len(views) * len(order))
        x_fit = np.concatenate([v[order] for v in views])[mix]
        y_fit = np.concatenate([y[order]] * len(views))[mix]
        say(f"head: training on {len(order)} products of {len(class_names)} classes"
            f"{f' in {len(views)} views each' if len(views) > 1 else ''} "
            f"for {cfg.epochs} epochs")
        self.head_ = self._new_head(len(class_names), progress).fit(
            x_fit, y_fit, validation_data=(views[0][val], y[val]) if len(val) else None)
        timings["head_s"] = time.perf_counter() - t

        t = time.perf_counter()
        probs, embeddings = self.head_outputs(views)
        val_acc = self.head_.history_.get("val_accuracy")
        held = np.flatnonzero(roles == "heldout")
        scores = {"head_val_accuracy": val_acc[-1] if val_acc else None,
                  "head_heldout_accuracy": (float(np.mean(probs[held].argmax(1) == y[held]))
                                            if len(held) else None)}
        dataset_meta = {
            "name": "catalog",
            "kind": "catalog",
            "source": catalog.source,
            "class_names": list(class_names),
            "image_size": cfg.image_size,
            "image_fit": cfg.image_fit,
            "flip": cfg.flip,
            "n_items": len(clean),
            "n_skipped": self.report_["n_skipped"],
            "min_class_size": min_class_size,
            "content_sha256": digest,
            "features_sha256": features_key,
            "split": {**split, "file": SPLIT_FILE},
            "catalog": "every readable image of the catalog",
        }
        self._finish(info, dataset_meta, scores,
                     dict(embeddings=embeddings, ids=clean.ids, labels=y,
                          class_names=class_names, paths=[str(p) for p in clean.paths],
                          categories=clean.categories),
                     timings, t0, t, progress, say)
        if val_acc:
            where = ("validation/" if len(val) else
                     f"{cfg.validation_split:.0%} of the training products")
            say(f"head validation accuracy ({where}): {val_acc[-1]:.4f}")
        if len(held):
            say(f"head accuracy on the {len(held)} held-out products: "
                f"{scores['head_heldout_accuracy']:.4f}")
        return self

    def _new_head(self, n_classes, progress):
        cfg = self.config
        return ClassifierHead(
            n_classes=n_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, dropout=cfg.dropout,
            # trained on train+validation: nothing is left for a validation curve
            validation_split=0.0 if cfg.train_on != "train" else cfg.validation_split,
            seed=cfg.seed,
            verbose="auto" if progress else 0,
        )

    def _finish(self, info, dataset_meta, scores, index_args, timings, t0, t, progress, say):
        """Record what made the run and build its index and search back-end (shared by
        both fits)."""
        self.run_dir_ = None  # a new run: updates go to where it is saved, not a loaded one
        self.run_id_ = uuid.uuid4().hex
        self.metadata_ = {
            "run_id": self.run_id_,
            "fashionrec_version": __version__,
            "created": now_iso(),
            "versions": package_versions(),
            "config": self.config.to_dict(),
            "backbone": info.to_dict(),
            "backbone_description": info.describe(),
            "dataset": dataset_meta,
            **scores,
        }
        self.index_ = CatalogIndex.build(metadata=self.metadata_, **index_args)
        spec = self.config.search_spec(len(self.index_), log=say)
        if spec["backend"] != "exact":
            say(f"index: building the {spec['backend']} graph over {len(self.index_)} items")
        self.index_.backend = search.build(spec, self.index_.vectors, progress=progress)
        self.metadata_["search"] = spec
        timings["index_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        timings["peak_rss_mb"] = peak_rss_mb()
        self.metadata_["timings"] = timings

    @property
    def is_catalog(self):
        """Whether the run was trained on a product catalog (not Fashion-MNIST)."""
        return self.metadata_.get("dataset", {}).get("kind") == "catalog"

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
        store = IndexStore(run_dir / INDEX_FILE)
        store.reset()  # updates made to an earlier run's index
        self.head_.save(run_dir, run_id=self.run_id_)
        store.write_base(self.index_)  # and its HNSW graph, if it has one
        if getattr(self, "report_", None) is not None:
            write_json(run_dir / REPORT_FILE, self.report_)
        if getattr(self, "split_", None) is not None:
            write_json(run_dir / SPLIT_FILE, {"run_id": self.run_id_, **self.split_.to_dict()})
        else:
            (run_dir / SPLIT_FILE).unlink(missing_ok=True)  # an earlier run's
        write_json(run_dir / RUN_FILE, self.metadata_)
        self.run_dir_ = run_dir
        return run_dir

    @staticmethod
    def read_run_id(run_dir):
        """The run id ``run_dir/run.json`` names (cheap: no model is loaded)."""
        return read_json(Path(run_dir) / RUN_FILE, "run file").get("run_id")

    @classmethod
    def load(cls, run_dir, log=_stderr):
        """Load a run saved by :meth:`save`, in this or any other process.

        A run searched with HNSW whose saved graph is missing, stale or damaged gets
        it rebuilt (announced through ``log``)."""
        run_dir = Path(run_dir)
        if not (run_dir / RUN_FILE).is_file():
            raise FashionrecError(f"no trained run in {run_dir}; run `make train` first")
        meta = read_json(run_dir / RUN_FILE, "run file")
        try:
            config = dict(meta["config"])
            if meta.get("dataset", {}).get("kind") == "catalog":
                # runs made before these settings existed: letterboxed, not mirrored
                config["image_fit"] = config.get("image_fit") or "pad"
                config["flip"] = bool(config.get("flip"))
            config["pooling"] = meta.get("backbone", {}).get("pooling", "avg")
            rec = cls(RunConfig.from_dict(config, check_paths=False))
            info = BackboneInfo.from_dict(meta["backbone"])
        except (KeyError, TypeError) as exc:
            raise FashionrecError(f"{run_dir / RUN_FILE} is not a fashionrec run ({exc})") from None
        rec.metadata_ = meta
        rec.run_id_ = meta.get("run_id")
        rec.head_ = ClassifierHead.load(run_dir)
        rec.index_ = IndexStore(run_dir / INDEX_FILE).load(rec.search_spec, log=log)
        rec.run_dir_ = run_dir
        if not rec.run_id_ or {rec.head_.run_id_, rec.index_.metadata.get("run_id")} != {
                rec.run_id_}:
            raise FashionrecError(
                f"{run_dir} mixes files of two runs (an interrupted save?); re-run `make train`")
        rec._backbone_info = info
        rec.split_ = None
        if (run_dir / SPLIT_FILE).is_file():
            split = read_json(run_dir / SPLIT_FILE, "split file")
            if split.get("run_id") != rec.run_id_:
                raise FashionrecError(f"{run_dir / SPLIT_FILE} belongs to another run; "
                                      f"re-run `make train`")
            rec.split_ = CatalogSplit.from_dict(split)
        return rec

    # ------------------------------------------------------------ recommend
    @property
    def extractor(self):
        """The run's feature extractor, built on first use (once, even when several
        threads ask at the same time)."""
        if not hasattr(self, "extractor_"):
            with self._lock:
                if not hasattr(self, "extractor_"):
                    model = rebuild_backbone(self._backbone_info)
                    self.extractor_ = FeatureExtractor(model, self._backbone_info,
                                                       self.config.extract_batch_size)
        return self.extractor_

    @property
    def class_names(self):
        return self.index_.class_names

    @property
    def search_spec(self):
        """How this run's catalog is searched (``run.json``'s ``search``; exact for runs
        made before there was a choice)."""
        return self.metadata_.get("search") or {"backend": "exact"}

    def test_images(self):
        """Images and labels of the test split the run was trained with."""
        if self.is_catalog:
            raise FashionrecError("this run indexes a product catalog, which has no test "
                                  "split; query by item id or by image")
        if getattr(self, "_dataset", None) is None:
            cfg = self.config
            x, y, folder = load_split(cfg.dataset, "test", cfg.data_dir)
            ids, images = self.index_.ids, self.index_.images
            base = (ids >= 0) & (ids < cfg.n_reco)  # items of the trained catalog
            if images is not None and not (
                    len(x) >= cfg.n_reco and np.array_equal(x[ids[base]], images[base])):
                raise FashionrecError(
                    f"the {cfg.dataset} test split in {folder} is not the one this run's "
                    f"catalog was made from; query by image instead")
            self._dataset = Dataset(cfg.dataset, None, None, x, y, get_spec(cfg.dataset).class_names)
        return self._dataset.x_test, self._dataset.y_test

    def query_image(self, query):
        """The image a query stands for (as the model sees it before resizing), and a
        dict describing the query."""
        views, info = self._query(query)
        return views[0], info

    def _query(self, query):
        """A query prepared for the backbone: ``(views, info)``, ``views`` one image per
        way the run fits photos to the square (``(n_fits, S, S, 3)``; Fashion-MNIST
        runs: ``(1, H, W)`` gray)."""
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            x_test, y_test = self.test_images()
            if not 0 <= int(query) < len(x_test):
                raise FashionrecError(
                    f"test index {int(query)} is out of range 0..{len(x_test) - 1}")
            label = int(y_test[query])
            return x_test[int(query)][None], {"kind": "test_index", "test_index": int(query),
                                              "true_label": label,
                                              "true_class": self.class_names[label]}
        if isinstance(query, (str, Path)):
            img, info = open_image(query), {"kind": "file", "source": str(query)}
        elif isinstance(query, (bytes, bytearray)):  # an uploaded file, read like a file
            img, info = decode_image(bytes(query), "upload"), {"kind": "upload",
                                                               "source": "upload"}
        elif isinstance(query, np.ndarray):
            if not self.is_catalog:
                return to_gray(query, self._image_shape())[None], {"kind": "array",
                                                                   "source": "array"}
            img, info = pil_from_array(query), {"kind": "array", "source": "array"}
        else:
            raise FashionrecError(f"a query is a test index, an image path, image bytes or "
                                  f"an image array, not {type(query).__name__}")
        if self.is_catalog:
            return fit_views(img, self.config.image_size, self.config.fits), info
        return gray_from_pil(img, self._image_shape())[None], info

    def head_outputs(self, views):
        """Class probabilities and 512-d embeddings from the backbone features of every
        view of the same images (one array per view, :meth:`RunConfig.views`): the mean
        over the views."""
        probs = np.mean([self.head_.predict_proba(v) for v in views], axis=0)
        emb = np.mean([self.head_.embed(v) for v in views], axis=0)
        return probs, emb

    def _views(self):
        """The views the run sees a product in (one for Fashion-MNIST runs)."""
        return self.config.views() if self.config.dataset == "catalog" else [(None, False)]

    def _image_features(self, images, progress=False):
        """Backbone features of every view of some prepared images, one array per view:
        ``(N, n_fits, S, S, 3)`` for a catalog run (:meth:`_query`), ``(N, H, W)`` for
        Fashion-MNIST (one backbone pass for all the views of a batch of photo queries).
        A catalog's files go through :meth:`_catalog_features` instead."""
        views, cfg = self._views(), self.config
        images = np.asarray(images)
        if views == [(None, False)]:
            return [self.extractor.transform(images, progress)]
        batch = [images[:, cfg.fits.index(fit)] for fit, _ in views]
        batch = [x[:, :, ::-1] if m else x for x, (_, m) in zip(batch, views, strict=True)]
        feats = self.extractor.transform(np.concatenate(batch), progress)
        return np.split(feats, len(views))

    def _catalog_features(self, catalog, digest, cache_dir=None, progress=True,
                          name="catalog", runner=None, info=None):
        """Features of a checked catalog's images in every view of the run, from the
        feature cache when it has them (one file per view; each image decoded once for
        all the views missing): ``(features per view, failed)``, ``failed`` mapping
        the rows whose image could not be decoded to the reason."""
        views, cfg = self._views(), self.config
        images = catalog.images(cfg.image_size, views=views)
        if cache_dir is None:
            if runner is not None:
                raise FashionrecError("extraction with a runner writes into a feature "
                                      "cache; give a cache folder")
            failed = {}
            per_view = [np.empty((len(catalog), self.extractor.info.feature_dim), np.float32)
                        for _ in views]
            for start, feats, bad in self.extractor.iter_batches(images, progress):
                failed.update(bad)
                for v, out in enumerate(per_view):
                    out[start:start + len(feats)] = feats[:, v]
            return per_view, failed
        info = info if info is not None else self.extractor.info
        cache = self._view_cache(cache_dir, info, digest, len(catalog), name)
        return cache.extract(self.extractor if runner is None else None, images, progress,
                             desc=f"extract {name}", views=views, runner=runner)

    def _view_cache(self, cache_dir, info, digest, n, name="catalog"):
        """The feature cache of ``n`` catalog images (content ``digest``) in every view
        of the run: one file per view, named and keyed as catalog runs always were."""
        names, keys = [], []
        for fit, mirror in self._views():
            plain = fit == "pad" and not mirror  # the key catalog runs always had
            tag = f"{fit}{'-mirror' if mirror else ''}"
            names.append(name if plain else f"{name}-{tag}")
            keys.append(digest if plain else
                        hashlib.sha256(f"{digest}\0{tag}".encode()).hexdigest())
        return ViewCache(cache_dir, info, names, keys, n)

    def catalog_features(self, cache_dir=None, progress=True):
        """Backbone features of every catalog item, in index-row order, one array per
        view of the run (the first: the photo as fitted first, not mirrored) — from the
        run's feature cache when the catalog is the one it was trained on."""
        index = self.index_
        if not self.is_catalog or index.paths is None:
            raise FashionrecError("only a product-catalog run has catalog image files")
        digests = []
        for item_id, path in zip(index.ids, index.paths, strict=True):
            try:
                digests.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            except OSError:
                raise FashionrecError(f"the image of item {item_id!r} ({path}) cannot be "
                                      f"read; the catalog's image files are needed") from None
        cat = Catalog([str(i) for i in index.ids], [Path(p) for p in index.paths],
                      [None] * len(index), [""] * len(index), sha256=digests)
        digest = cat.content_digest()
        meta = self.metadata_["dataset"]
        trained = digest == meta.get("features_sha256", meta.get("content_sha256"))
        views, failed = self._catalog_features(cat, digest, cache_dir, progress,
                                               "catalog" if trained else "catalog-now")
        if failed:
            row, reason = next(iter(failed.items()))
            raise FashionrecError(f"item {index.ids[row]!r}: {reason}")
        return views

    def _image_shape(self):
        return tuple(self.metadata_["dataset"].get("image_shape", (28, 28)))[:2]

    def item_image(self, item_id, index=None):
        """A catalog item's picture for display, or ``None`` if its file is gone
        (``index``: the index snapshot to look in; default the current one)."""
        index = self.index_ if index is None else index
        row = index.row_of(item_id)
        if row is None:
            raise FashionrecError(f"item {item_id!r} is not in the catalog")
        if index.images is not None:
            return index.images[row]
        if index.paths is not None and index.paths[row]:
            try:
                return read_image(index.paths[row], DISPLAY_SIZE)
            except FashionrecError:
                return None
        return None

    def recommend(self, query=None, k=6, *, item=None, same_class=False, category=None,
                  with_image=True):
        """The ``k`` catalog items nearest to a query.

        Args:
            query: a test-split index (``int``, Fashion-MNIST runs), an image file path
                (a new product), the bytes of an image file (an upload), or an image
                array (``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``, values
                0-255).
            k: how many items.
            item: instead of ``query``, the id of a catalog item (no image is read:
                its stored vector is the query).
            same_class: only items of the query's class (an item's own class, else the
                head's prediction for the query image).
            category: only items whose category path contains this (whole levels,
                any case: ``"Boots"`` matches ``"Shoes/Boots/Brand"``); items without
                a category are matched by their class name.
            with_image: keep an item query's picture in the result (for plots; a
                service that links to pictures skips reading it).

        A query that is itself in the catalog never gets itself back. With a filter,
        fewer than ``k`` items come back when fewer match. The whole query sees one
        state of the index, even while another thread adds or removes products.
        """
        self._check_fitted()
        _check_k(k)
        if (query is None) == (item is None):
            raise FashionrecError("give either a query (test index, image) or an item id")
        if item is None:
            result = self.recommend_batch([dict(query=query, k=k, same_class=same_class,
                                                category=category)])[0]
            if isinstance(result, FashionrecError):
                raise result
            return result
        index = self.index_  # one snapshot for the whole query
        row = index.row_of(item)
        if row is None:
            raise FashionrecError(f"item {item!r} is not in the catalog")
        label = int(index.labels[row])
        info = {"kind": "item", "id": index.ids[row].item() if index.id_kind == "int"
                else index.ids[row], "true_label": label,
                "true_class": self.class_names[label], "category": index.category_of(row)}
        if index.paths is not None and index.paths[row]:
            info["path"] = index.paths[row]
        return self._search(index, info, index.vectors[row:row + 1], label, row,
                            self.item_image(item, index) if with_image else None, k,
                            same_class, category)

    def recommend_batch(self, requests):
        """Recommendations for several image queries with one backbone call.

        Args:
            requests: dicts with ``query`` (a test index, an image path or array, as
                for :meth:`recommend`) and optionally ``k``, ``same_class``,
                ``category``.

        Returns:
            One :class:`Recommendation` per request, or the :class:`FashionrecError`
            that request met (a bad image fails its own request, not the batch).
        """
        self._check_fitted()
        index = self.index_  # one snapshot for the whole batch
        results, prepared = [None] * len(requests), []
        for i, req in enumerate(requests):
            try:
                _check_k(req.get("k", 6))
                views, info = self._query(req["query"])
                prepared.append((i, views, info))
            except FashionrecError as exc:
                results[i] = exc
        if not prepared:
            return results
        views = np.stack([v for _, v, _ in prepared])
        if not self.is_catalog:
            views = views[:, 0]
        probs, emb = self.head_outputs(self._image_features(views))
        vectors = index.transform(emb)
        for (i, image, info), p, vector in zip(prepared, probs, vectors, strict=True):
            image = image[0]  # shown as the photo was fitted first
            req, pred = requests[i], int(p.argmax())
            info.update(predicted_label=pred, predicted_class=self.class_names[pred],
                        probability=float(p[pred]))
            own_row = index.row_of(info["test_index"]) if info["kind"] == "test_index" else None
            try:
                results[i] = self._search(index, info, vector[None], pred, own_row, image,
                                          req.get("k", 6), req.get("same_class", False),
                                          req.get("category"))
            except FashionrecError as exc:
                results[i] = exc
        return results

    def _search(self, index, info, vector, query_class, own_row, image, k, same_class,
                category):
        """The nearest items of ``index`` to ``vector``, filtered; a Recommendation."""
        allowed = None
        if same_class or category is not None:
            mask = np.ones(len(index), dtype=bool)
            wanted = []
            if same_class:
                mask &= index.labels == query_class
                wanted.append(f"class {self.class_names[query_class]}")
            if category is not None:
                mask &= category_matches(index.all_categories(), category)
                wanted.append(f"category {category}")
            if own_row is not None:
                mask[own_row] = False
            allowed = np.flatnonzero(mask)
            info.update(filter=" and ".join(wanted), n_candidates=int(len(allowed)))
            if not len(allowed):
                raise FashionrecError(f"no other catalog item is in {info['filter']}")
            k = min(k, len(allowed))
        elif k > len(index) - (own_row is not None):
            n = len(index) - (own_row is not None)
            raise FashionrecError(f"k={k} is more than the catalog's {n} "
                                  f"{'other ' if own_row is not None else ''}items")
        exclude = None if own_row is None or allowed is not None else [own_row]
        rows, dists = index.search_rows(vector, k, exclude, allowed)
        items = [self._item(index, r + 1, row, d) for r, (row, d) in
                 enumerate(zip(rows[0], dists[0], strict=True))]
        return Recommendation(query=info, items=items, image=image)

    def _item(self, index, rank, row, distance):
        item_id = index.ids[row]
        return Item(rank=rank, id=int(item_id) if index.id_kind == "int" else str(item_id),
                    label=int(index.labels[row]),
                    class_name=self.class_names[int(index.labels[row])],
                    distance=float(distance),
                    category=index.category_of(row) if index.categories is not None else None,
                    path=str(index.paths[row]) if index.paths is not None and index.paths[row]
                    else None)

    # ------------------------------------------------------ a living catalog
    def read_catalog(self, path, **options):
        """Read a folder or CSV of products with the options this run was trained with
        (label depth, columns, pattern), each overridable."""
        saved = {k: v for k, v in self.metadata_.get("dataset", {}).get("source", {}).items()
                 if k in ("label_depth", "label_column", "id_column", "image_column",
                          "image_pattern", "category_columns")}
        if Path(path).is_dir():
            saved = {k: v for k, v in saved.items() if k == "label_depth"}
        return Catalog.read(path, **{**saved, **{k: v for k, v in options.items()
                                                 if v is not None}})

    def add(self, catalog, progress=True, log=print):
        """Add new products to the saved index without retraining.

        Their images go through the run's backbone and head; their vectors are
        standardized with the catalog's scaler and written as one new segment of the
        saved index (the rest is not rewritten; see :class:`~fashionrec.index.IndexStore`).

        Args:
            catalog: a :class:`~fashionrec.catalog.Catalog` of the new products (e.g.
                :meth:`read_catalog` or ``Catalog.from_files``). An item without a class
                gets the head's prediction; an item of a class the head does not know,
                or whose id is already in the index, is skipped and reported (so adding
                a whole folder again adds just its new products).

        Returns:
            A report: ``n_added``, ``added`` ids with their classes, ``skipped`` items.
        """
        self._check_fitted()
        say = log or (lambda *_: None)
        store = self._store()
        for item_id in catalog.ids:  # ids of the wrong kind stop us before any work
            self._check_new_id(self.index_.parse_id(item_id))
        # a catalog run decodes each new image once, in the extractor, which reports a
        # file that does not decode; a Fashion-MNIST run reads them here
        clean, report = catalog.check(min_class_size=1, progress=progress,
                                      decode=not self.is_catalog)
        keep, labels, skipped = [], [], list(report["skipped"])
        for i, (item_id, label) in enumerate(zip(clean.ids, clean.labels, strict=True)):
            reason = None
            # the index as loaded; the store checks again under its lock when writing
            if self.index_.row_of(item_id) is not None:
                kind, reason = "already in the index", "remove it first to replace it"
            elif label is not None and label not in self.class_names:
                kind = "unknown class"
                reason = f"class {label!r} is not one this run was trained on; retrain to add it"
            if reason:
                skipped.append({"id": item_id, "path": str(clean.paths[i]), "kind": kind,
                                "reason": reason})
                continue
            keep.append(i)
            labels.append(None if label is None else self.class_names.index(label))
        clean = clean.subset(keep)
        result = {"n_added": 0, "added": [], "skipped": skipped}
        feats = stored_images = None
        if self.is_catalog and len(clean):
            feats, failed = self._catalog_features(clean, None, None, progress)
            if failed:
                good = [i for i in range(len(clean)) if i not in failed]
                clean, dropped = clean.drop_failed(failed, {"skipped": []})
                skipped += dropped["skipped"]
                labels = [labels[i] for i in good]
                feats = [f[good] for f in feats]
        if not len(clean):
            say("add: no usable new products")
            return result
        ids = [self.index_.parse_id(i) for i in clean.ids]
        if not self.is_catalog:  # a Fashion-MNIST catalog stores 28x28 gray images
            stored_images = np.stack([load_image(p, self._image_shape()) for p in clean.paths])
            feats = self._image_features(stored_images, progress)
        probs, emb = self.head_outputs(feats)
        predicted = probs.argmax(axis=1)
        labels = [int(p) if lab is None else lab for lab, p in zip(labels, predicted, strict=True)]
        part = CatalogIndex(
            self.index_.transform(emb), ids, labels, self.class_names,
            self.index_.scaler,
            None if stored_images is None else np.clip(stored_images, 0, 255).astype(np.uint8),
            paths=[str(p) for p in clean.paths], categories=clean.categories)
        store.add(part)
        self.index_ = store.load(self.search_spec, log=say)
        result.update(n_added=len(ids), added=[
            {"id": i, "class": self.class_names[lab],
             "class_from": "catalog" if given is not None else "predicted"}
            for i, lab, given in zip(ids, labels, clean.labels, strict=True)])
        say(f"add: {len(ids)} product(s) added, {len(skipped)} skipped; the catalog now "
            f"holds {len(self.index_)} items")
        return result

    def remove(self, ids, log=print):
        """Remove discontinued products (by id) from the saved index; all or nothing."""
        self._check_fitted()
        ids = list(ids)  # any iterable, counted after it is read
        store = self._store()
        store.remove(ids)
        self.index_ = store.load(self.search_spec, log=log)
        if log:
            log(f"remove: {len(ids)} product(s) removed; the catalog now holds "
                f"{len(self.index_)} items")
        return self

    def _check_new_id(self, item_id):
        """On a dataset run an item id below the test split's size is that test image:
        a new product may not take one, so ids and test indices never mix."""
        if self.is_catalog or not isinstance(item_id, int):
            return
        n_test = self.metadata_["dataset"].get("n_test", get_spec(self.config.dataset).n_test)
        if 0 <= item_id < n_test:
            raise FashionrecError(
                f"id {item_id} is test image {item_id} of {self.config.dataset}; new products "
                f"take ids from {n_test} up (ids below are the test images themselves)")

    def compact(self, progress=True, log=print):
        """Fold the added and removed products into a new base index (and a new HNSW
        graph, for a run searched with one), atomically; see
        :meth:`fashionrec.store.IndexStore.compact`."""
        self._check_fitted()
        store = self._store()
        manifest = store.compact(self.search_spec, progress=progress, log=log)
        self.index_ = store.load(self.search_spec, log=log)
        return manifest

    def reindex(self, search_choice, progress=True, log=print, **hnsw_params):
        """Search this saved run another way (``"exact"``, ``"hnsw"`` or ``"auto"``)
        without retraining: build (or drop) its HNSW graph and record the choice in
        ``run.json``.

        Args:
            search_choice: as ``RunConfig.search``.
            hnsw_params: ``hnsw_m``, ``hnsw_ef_construction``, ``hnsw_ef_search``
                overriding the run's.
        """
        self._check_fitted()
        store = self._store()
        config = RunConfig.from_dict({**self.config.to_dict(), "search": search_choice,
                                      **{k: v for k, v in hnsw_params.items()
                                         if v is not None}}, check_paths=False)
        spec = config.search_spec(len(self.index_), log=log)
        store.build_graph(spec, progress=progress, log=log)
        self.config = config
        self.metadata_ = {**self.metadata_, "config": config.to_dict(), "search": spec}
        write_json(Path(self.run_dir_) / RUN_FILE, self.metadata_)
        self.index_ = store.load(spec, log=log)
        return spec

    def _store(self):
        if getattr(self, "run_dir_", None) is None:
            raise FashionrecError("save() the run first: updates go to its saved index")
        return IndexStore(Path(self.run_dir_) / INDEX_FILE, lock_wait=self.lock_wait)


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise FashionrecError(f"k must be a positive integer, got {k!r}")


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
    """Read an image file as gray ``shape``-sized array (values 0-255), read and
    checked like a catalog image (:func:`fashionrec.catalog.open_image`)."""
    return gray_from_pil(open_image(path), shape)


def gray_from_pil(img, shape):
    """A decoded PIL image as a gray ``shape``-sized float32 array (values 0-255)."""
    from PIL import Image

    img = img.convert("L").resize(tuple(reversed(shape)), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)
