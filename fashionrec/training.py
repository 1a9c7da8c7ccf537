"""Training: the two fit pipelines, from images to a trained model and its catalog.

:func:`train_dataset` (Fashion-MNIST) and :func:`train_catalog` (your own products)
extract backbone features (cached), train the head, fit the
:class:`~fashionrec.embedder.Embedder` and embed the catalog, and return a
:class:`Trained`: the model, the catalog's rows and the record ``run.json`` keeps.
Nothing here writes a run folder (:mod:`fashionrec.publish` does).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from . import __version__, expansion, search
from . import attributes as attrs
from .artifacts import now_iso, package_versions, peak_rss_mb
from .catalog import CatalogSplit, assign_splits, format_report
from .config import RunConfig
from .data import load_dataset
from .embedder import PLAIN, Embedder
from .errors import FashionrecError
from .extract import FeatureExtractor, build_backbone, cached_features
from .head import ClassifierHead
from .index import CatalogIndex


@dataclass
class Trained:
    """A trained model and its catalog, not yet saved.

    ``metadata`` is the run's record (``run.json``): its ``config`` is the one copy of
    the settings, its ``run_id`` the one copy of the id."""

    embedder: Embedder
    index: CatalogIndex
    metadata: dict
    report: dict | None = None
    split: CatalogSplit | None = None
    timings: dict = field(default_factory=dict)
    dataset: object = None  # the Dataset a Fashion-MNIST run was trained on
    @property
    def config(self):
        """The settings, derived from the record (their one copy)."""
        return RunConfig.of_run(self.metadata)


def _head(cfg, n_classes, progress):
    return ClassifierHead(
        n_classes=n_classes, epochs=cfg.epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, dropout=cfg.dropout,
        metric_loss=cfg.metric_loss_setting(),
        # trained on train+validation: nothing is left for a validation curve
        validation_split=0.0 if cfg.train_on != "train" else cfg.validation_split,
        seed=cfg.seed, verbose="auto" if progress else 0)


def _backbone(cfg, say, catalog):
    return build_backbone(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed, log=say,
                          pooling=cfg.resolved(catalog=catalog).pooling, engine=cfg.engine,
                          precision=cfg.precision)


def train_dataset(config, dataset=None, cache_dir=None, progress=True, say=print):
    """Fashion-MNIST: the first ``n_train`` training images train the head, the first
    ``n_reco`` test images are the catalog."""
    if config.flip or config.image_fit:
        raise FashionrecError("flip and image_fit are for product-catalog runs "
                              "(fit_catalog); Fashion-MNIST images are square")
    if config.fine_tune_blocks:
        raise FashionrecError("--fine-tune-blocks is for product-catalog runs (--catalog)")
    cfg = config.resolved(catalog=False)
    timings, t0 = {}, time.perf_counter()
    # the backbone is resolved first, so a missing one stops us before long work
    model, info = _backbone(cfg, say, catalog=False)
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
    for name, n, have, split in (("n_train", cfg.n_train, len(dataset.x_train), "training"),
                                 ("n_reco", cfg.n_reco, len(dataset.x_test), "test")):
        if n > have:
            raise FashionrecError(f"{name} {n} exceeds the {have} {split} images of "
                                  f"{dataset.name}")
    x_train, y_train = dataset.x_train[:cfg.n_train], dataset.y_train[:cfg.n_train]
    x_cat, y_cat = dataset.x_test[:cfg.n_reco], dataset.y_test[:cfg.n_reco]
    timings["setup_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    extractor = FeatureExtractor(model, info, cfg.extract_batch_size)
    if cache_dir is not None:
        f_train = cached_features(extractor, x_train, cache_dir, "train", progress)
        f_cat = cached_features(extractor, x_cat, cache_dir, "catalog", progress)
    else:
        f_train, f_cat = extractor.transform(x_train, progress), extractor.transform(x_cat,
                                                                                  progress)
    timings["extract_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"head: training on {len(f_train)} feature vectors for {cfg.epochs} epochs")
    head = _head(cfg, len(dataset.class_names), progress).fit(f_train, y_train)
    timings["head_s"] = time.perf_counter() - t

    t = time.perf_counter()
    embedder, probs, vectors = Embedder.fit(info, head, [f_cat], PLAIN, cfg.extract_batch_size,
                                            extractor)
    accuracy = float(np.mean(probs.argmax(1) == y_cat))
    dataset_meta = {
        "name": dataset.name, "kind": "dataset", "n_test": int(len(dataset.x_test)),
        "source": dataset.source, "class_names": list(dataset.class_names),
        "image_shape": list(dataset.x_test.shape[1:]), "n_train": int(cfg.n_train),
        "n_reco": int(cfg.n_reco), "catalog": f"first {cfg.n_reco} test images"}
    trained = _finish(cfg, embedder, dataset_meta, {"head_test_accuracy": accuracy},
                      dict(vectors=vectors, ids=np.arange(cfg.n_reco), labels=y_cat,
                           class_names=dataset.class_names, images=x_cat),
                      timings, t0, t, progress, say)
    say(f"head test accuracy on the {cfg.n_reco} catalog images: {accuracy:.4f}")
    trained.dataset = dataset
    return trained


def extract_catalog(config, catalog, min_class_size=5, cache_dir=None, progress=True,
                    say=print, runner=None, timings=None):
    """Backbone, header check and features of every view of a catalog: ``(config
    resolved for the catalog, listed catalog, report, features per view, failed rows,
    embedder without head)``. ``runner`` (e.g. Ray) computes them into ``cache_dir``."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    model, info = _backbone(config, say, catalog=True)
    if any(label is None for label in catalog.labels):
        raise FashionrecError("every catalog item needs a class to train on")
    # headers only: each image is decoded once, by the extractor's background workers
    listed, report = catalog.check(min_class_size, progress, decode=False)
    _check_usable(catalog, report, say)  # an empty catalog stops before extraction
    cfg = RunConfig.from_dict({**config.resolved(catalog=True).to_dict(),
                               "dataset": "catalog", "data_dir": None})
    timings["setup_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    extractor = None
    if runner is None:
        extractor = FeatureExtractor(model, info, cfg.extract_batch_size)
    else:
        runner.prepare(info, cfg.extract_batch_size)
    shell = Embedder(info, None, None, cfg.views(), cfg.extract_batch_size, extractor)
    views, failed = shell.catalog_features(listed, listed.content_digest(), cache_dir,
                                           progress, runner=runner)
    timings["extract_s"] = time.perf_counter() - t
    return cfg, listed, report, views, failed, shell


def _check_usable(catalog, report, say):
    """A catalog with no usable product, or fewer than 2 classes, stops here with one
    line (its report is said first)."""
    n_classes = len(report["class_counts"])
    if report["n_ok"] and n_classes >= 2:
        return
    say(format_report(report, max_listed=5))
    source = catalog.source or {}
    where = source.get("root") or source.get("manifest") or "given"
    if not report["n_ok"]:
        raise FashionrecError(f"the catalog {where} has no usable product (see the report: "
                              f"{report['n_skipped']} skipped)")
    raise FashionrecError(f"the catalog {where} has {n_classes} usable class(es); 2 classes "
                          f"needed (see the report: {report['n_skipped']} skipped)")


def extract_only(config, catalog, min_class_size, cache_dir, progress, say, runner):
    """:func:`extract_catalog` alone (``fashionrec extract``): ``{"n_items", "n_failed",
    "failed", "files"}``."""
    _, listed, _, _, failed, shell = extract_catalog(config, catalog, min_class_size,
                                                     cache_dir, progress, say, runner)
    cache = shell.view_cache(cache_dir, listed.content_digest(), len(listed))
    return {"n_items": len(listed), "n_failed": len(failed),
            "failed": {listed.ids[r]: why for r, why in sorted(failed.items())},
            "files": [p.name for p in cache.paths]}


def train_catalog(config, catalog, min_class_size=5, holdout=None, cache_dir=None,
                  progress=True, say=print):
    """Your own products: every readable product is indexed; which ones train the head
    is decided by the split (:func:`fashionrec.catalog.assign_splits`)."""
    timings, t0 = {}, time.perf_counter()
    if catalog.splits is not None and holdout:
        assign_splits(catalog, holdout)  # the one-line refusal, before any long work
    tuned = None
    if config.fine_tune_blocks:
        t = time.perf_counter()
        path, tuned = _fine_tune(config.resolved(catalog=True), catalog, min_class_size,
                                 holdout, cache_dir, progress, say)
        timings["fine_tune_s"] = time.perf_counter() - t
        config = RunConfig.from_dict({**config.to_dict(), "backbone": str(path),
                                      "weights": "imagenet"}, check_paths=False)
    cfg, listed, report, views, failed, shell = extract_catalog(
        config, catalog, min_class_size, cache_dir, progress, say, timings=timings)
    if tuned is not None:  # the record keeps the settings asked for; the backbone record
        cfg = RunConfig.from_dict({**cfg.to_dict(), "backbone": tuned["asked"]["backbone"],
                                   "weights": tuned["asked"]["weights"]}, check_paths=False)
    features_key = listed.content_digest()
    clean, report = listed.drop_failed(failed, report)
    if failed:
        ok = np.array([i for i in range(len(listed)) if i not in failed], dtype=np.int64)
        views = [v[ok] for v in views]
    say(format_report(report, max_listed=5))
    class_names = tuple(c for c, n in report["class_counts"].items() if n)
    if len(class_names) < 2:
        raise FashionrecError(f"the catalog has {len(class_names)} usable class(es); "
                              f"training needs at least 2 (see the report above)")
    y = np.array([class_names.index(label) for label in clean.labels], dtype=np.int64)
    roles, train, split = _split(cfg, clean, y, holdout, say)
    cfg = RunConfig.from_dict({**cfg.to_dict(), "n_train": len(train), "n_reco": len(clean)})

    t = time.perf_counter()
    val = np.flatnonzero(roles == "validation") if cfg.train_on == "train" else []
    head = _fit_views_head(cfg, views, y, train, val, len(class_names), progress, say)
    timings["head_s"] = time.perf_counter() - t

    t = time.perf_counter()
    embedder, probs, vectors = Embedder.fit(shell.info, head, views, cfg.views(),
                                            cfg.extract_batch_size, shell._extractor)
    val_acc = head.history_.get("val_accuracy")
    held = np.flatnonzero(roles == "heldout")
    scores = {"head_val_accuracy": val_acc[-1] if val_acc else None,
              "head_heldout_accuracy": (float(np.mean(probs[held].argmax(1) == y[held]))
                                        if len(held) else None)}
    dataset_meta = {
        "name": "catalog", "kind": "catalog", "source": catalog.source,
        "class_names": list(class_names), "image_size": cfg.image_size,
        "image_fit": cfg.image_fit, "flip": cfg.flip, "n_items": len(clean),
        "n_skipped": report["n_skipped"], "min_class_size": min_class_size,
        "content_sha256": clean.content_digest(), "features_sha256": features_key,
        "split": split.summary(len(clean)), "catalog": "every readable image of the catalog"}
    trained = _finish(cfg, embedder, dataset_meta, scores,
                      dict(vectors=vectors, ids=clean.ids, labels=y, class_names=class_names,
                           paths=[str(p) for p in clean.paths], categories=clean.categories,
                           **_attribute_columns(clean, say)),
                      timings, t0, t, progress, say)
    trained.report, trained.split = report, split
    if tuned is not None:
        trained.metadata["fine_tune"] = {k: v for k, v in tuned.items() if k != "asked"}
    _say_scores(cfg, scores, val, held, say)
    return trained


def _fine_tune(cfg, catalog, min_class_size, holdout, cache_dir, progress, say):
    """The tuned backbone's path and record, trained on the products that will train
    the head (the same split rule)."""
    from . import finetune

    listed, report = catalog.check(min_class_size, progress, decode=False)
    _check_usable(catalog, report, say)
    names = tuple(c for c, n in report["class_counts"].items() if n)
    y = np.array([names.index(label) for label in listed.labels], dtype=np.int64)
    roles = assign_splits(listed, holdout, cfg.seed)
    fit = ["train"] + (["validation"] if cfg.train_on == "train+validation" else [])
    rows = np.flatnonzero(np.isin(roles, fit))
    path, record = finetune.tune_backbone(cfg, listed.subset(rows.tolist()), y[rows],
                                          len(names), cache_dir, progress, say)
    return path, {**record, "asked": {"backbone": cfg.backbone, "weights": cfg.weights}}


def _split(cfg, clean, y, holdout, say):
    """``(roles, rows that train the head, CatalogSplit)``."""
    roles = assign_splits(clean, holdout, cfg.seed)
    fit_roles = ["train"] + (["validation"] if cfg.train_on == "train+validation" else [])
    if cfg.train_on != "train" and not (roles == "validation").any():
        raise FashionrecError("train_on train+validation needs a validation split "
                              "(split folders with validation/ or val/)")
    train = np.flatnonzero(np.isin(roles, fit_roles))
    if len(np.unique(y[train])) < 2:
        raise FashionrecError("the products left to train on cover fewer than 2 classes")
    split = CatalogSplit.from_roles(clean.ids, roles, holdout, cfg.seed,
                                    split_folders=clean.splits is not None)
    s = split.summary(len(clean))
    if s["method"] != "none" and cfg.train_on == "train":
        say(f"split ({s['method']}): {s['train']} products train the head, "
            f"{s['validation']} validate it, {s['heldout']} are held out "
            f"(all {len(clean)} are indexed)")
    elif s["method"] != "none":
        say(f"split ({s['method']}): {len(train)} products of train and validation train "
            f"the head, {s['heldout']} are held out (all {len(clean)} are indexed)")
    return roles, train, split


def _fit_views_head(cfg, views, y, train, val, n_classes, progress, say):
    """The head trained on every view of the training products (a mirrored or cropped
    view is one more example to learn from), validated on the first view."""
    order = train[np.random.default_rng(cfg.seed).permutation(len(train))]
    mix = np.random.default_rng(cfg.seed + 1).permutation(len(views) * len(order))
    x_fit = np.concatenate([v[order] for v in views])[mix]
    y_fit = np.concatenate([y[order]] * len(views))[mix]
    say(f"head: training on {len(order)} products of {n_classes} classes"
        f"{f' in {len(views)} views each' if len(views) > 1 else ''} for {cfg.epochs} epochs")
    return _head(cfg, n_classes, progress).fit(
        x_fit, y_fit, validation_data=(views[0][val], y[val]) if len(val) else None)


def _say_scores(cfg, scores, val, held, say):
    if scores["head_val_accuracy"] is not None:
        where = ("validation/" if len(val) else
                 f"{cfg.validation_split:.0%} of the training products")
        say(f"head validation accuracy ({where}): {scores['head_val_accuracy']:.4f}")
    if len(held):
        say(f"head accuracy on the {len(held)} held-out products: "
            f"{scores['head_heldout_accuracy']:.4f}")


def _attribute_columns(catalog, say):
    """``{"schema", "attributes"}`` of a (clean) catalog's products: each attribute's
    type inferred from its values."""
    if not catalog.attributes:
        return {}
    schema = attrs.infer_schema(catalog.attributes)
    say("attributes: " + ", ".join(f"{k} ({v})" for k, v in schema.items()))
    return {"schema": schema, "attributes": attrs.columns(schema, catalog.attributes,
                                                          len(catalog), catalog.ids)}


def _finish(cfg, embedder, dataset_meta, scores, rows, timings, t0, t, progress, say):
    """The run's record and its catalog index with its search back-end."""
    run_id = uuid.uuid4().hex
    metadata = {
        "run_id": run_id, "fashionrec_version": __version__, "created": now_iso(),
        "versions": package_versions(), "config": cfg.to_dict(),
        "backbone": embedder.info.to_dict(), "backbone_description": embedder.info.describe(),
        "dataset": dataset_meta, "head_loss": {
            "softmax": "categorical cross-entropy, balanced class weights",
            "metric": cfg.metric_loss_setting()}, **scores}
    spec = cfg.search_spec(len(rows["vectors"]), log=say)
    if spec.get("dba"):
        say(f"index: database-side augmentation, each of {len(rows['vectors'])} items with "
            f"its {spec['dba']['k']} nearest")
        rows["vectors"] = expansion.augment_catalog(
            rows["vectors"], search.build(spec, rows["vectors"], progress=progress), spec["dba"])
    index = CatalogIndex(**rows, metadata={"run_id": run_id})
    if index.schema:  # the products' attributes and their types (filters check them)
        metadata["attributes"] = index.schema
    if spec["backend"] != "exact":
        say(f"index: building the {spec['backend']} graph over {len(index)} items")
    index.backend = search.build(spec, index.vectors, progress=progress)
    index.query_expansion = spec.get("query_expansion")
    metadata["search"] = spec
    timings["index_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    timings["peak_rss_mb"] = peak_rss_mb()
    metadata["timings"] = timings
    return Trained(embedder, index, metadata, timings=timings)
