"""``fashionrec train | extract | recommend | add | remove | compact | index | evaluate |
plot | serve`` — a thin layer over the library.

Every user error is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .config import (
    CATALOG_DEFAULTS,
    DATASET_NAMES,
    ENGINES,
    FITS,
    POOLINGS,
    PRECISIONS,
    RECIPE_DEFAULTS,
    SEARCH_CHOICES,
    TRAIN_ON,
    RunConfig,
)
from .errors import FashionrecError

DEFAULT_RUN_DIR = "runs/default"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(low):
    """An argparse type: an integer >= ``low``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
        return value
    return parse


_positive = _int_at_least(1)


def _share(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.2, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1), got {text}")
    return value
_non_negative = _int_at_least(0)


def build_parser():
    d = RunConfig.__dataclass_fields__
    p = _Parser(prog="fashionrec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="extract features, train the head, build the catalog index",
                       description="Run the whole pipeline and save the run under --run-dir.")
    t.add_argument("--dataset", choices=DATASET_NAMES, default=d["dataset"].default,
                   help="which dataset (default: %(default)s)")
    t.add_argument("--data-dir", default=None,
                   help="folder searched first for the four IDX .gz files (then data/, "
                        "~/.keras/datasets, ../shared/datasets, then a checked download)")
    t.add_argument("--n-train", type=_positive, default=d["n_train"].default,
                   help="first N training images train the head (default: %(default)s)")
    t.add_argument("--n-reco", type=_positive, default=d["n_reco"].default,
                   help="first N test images form the catalog (default: %(default)s)")
    t.add_argument("--epochs", type=_positive, default=None,
                   help=f"head training epochs (default: {RECIPE_DEFAULTS['epochs']}; "
                        f"product catalogs {CATALOG_DEFAULTS['epochs']})")
    t.add_argument("--learning-rate", type=float, default=None,
                   help=f"the head's Adam learning rate (default: "
                        f"{RECIPE_DEFAULTS['learning_rate']:g}; product catalogs "
                        f"{CATALOG_DEFAULTS['learning_rate']:g})")
    t.add_argument("--batch-size", type=_positive, default=d["batch_size"].default,
                   help="head training batch size (default: %(default)s)")
    t.add_argument("--dropout", type=float, default=d["dropout"].default,
                   help="the head's dropout rate (default: %(default)s)")
    _backbone_options(t, d)
    t.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="where the run's files go (default: %(default)s)")
    _output_options(t)
    _search_options(t, d)
    c = t.add_argument_group(
        "your own products (instead of --dataset)",
        "--catalog FOLDER: class = the first --label-depth folder levels; "
        "--catalog FILE.csv: one row per product, image paths relative to the CSV")
    c.add_argument("--catalog", default=None,
                   help="an image folder (category/subcategory/.../image) or a CSV manifest")
    _catalog_options(c)
    c.add_argument("--holdout", type=_share, default=CATALOG_OPTIONS["holdout"],
                   help="share of the products kept out of training (seeded, stratified by "
                        "class) for an honest `fashionrec evaluate`; they are still indexed. "
                        "Split folders (train/ validation/ test/) hold test/ out by themselves")
    _view_options(c)
    c.add_argument("--train-on", choices=TRAIN_ON, default=CATALOG_OPTIONS["train_on"],
                   help="split folders: which products train the head: train (validation/ "
                        "draws the validation curve) or, once settings are chosen, "
                        "train+validation (default: %(default)s)")

    x = sub.add_parser(
        "extract", help="only extract a catalog's features into a run's feature cache",
        description="Extract the backbone features of a catalog (every view) into "
                    "RUN_DIR/features, here or across machines with Ray; a following "
                    "`fashionrec train --catalog` with the same options uses them. A killed "
                    "extraction resumes where it stopped.")
    x.add_argument("--catalog", required=True,
                   help="an image folder or a CSV manifest (as for train)")
    _catalog_options(x)
    _view_options(x)
    _backbone_options(x, d)
    x.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="extract on Ray Data (pip install 'fashionrec[ray]'): no ADDRESS "
                        "starts a local Ray; 'auto' or ray://HOST:PORT joins a cluster")
    x.add_argument("--ray-workers", type=_positive, default=None,
                   help="Ray actors, one model each (default: local Ray 2, a cluster: "
                        "its CPUs / 4)")
    x.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="the run whose feature cache is filled (default: %(default)s)")
    _output_options(x)

    r = sub.add_parser("recommend", help="the K catalog items nearest to a query",
                       description="Recommend catalog items for a catalog item, a test image "
                                   "or an image file (e.g. a new product).")
    q = r.add_mutually_exclusive_group(required=True)
    q.add_argument("--item", help="id of a catalog item")
    q.add_argument("--idx", type=int, help="index of the query in the test split "
                                           "(Fashion-MNIST runs)")
    q.add_argument("--image", help="an image file (PNG, JPEG, WebP, ...) to use as the query")
    r.add_argument("-k", "--k", type=_positive, default=6,
                   help="how many items (default: %(default)s)")
    r.add_argument("--same-class", action="store_true",
                   help="only items of the query's class (an item's own, else the predicted)")
    r.add_argument("--category", default=None,
                   help="only items whose category path contains this, e.g. Boots or "
                        "Shoes/Boots")
    r.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="the trained run (default: %(default)s)")
    r.add_argument("--out", default=None,
                   help="PNG to write (default: RUN_DIR/plots/recommend-<query>.png)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")

    a = sub.add_parser("add", help="add new products to a trained run's index",
                       description="Embed new products with the run's backbone and head and "
                                   "append them to its index (no retraining; the index file "
                                   "is not rewritten).")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--catalog", help="a folder or CSV of new products (the run's layout "
                                       "options apply unless given here)")
    src.add_argument("--image", nargs="+", help="image file(s) of new products; id = file name")
    a.add_argument("--id", default=None, help="the id of a single --image (default: its name)")
    a.add_argument("--label", default=None,
                   help="the class of the --image products (default: the head's prediction)")
    _catalog_options(a, defaults=False)
    a.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="the trained run (default: %(default)s)")
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(a)

    rm = sub.add_parser("remove", help="remove discontinued products from a run's index",
                        description="Remove items by id (all or nothing; the index file is "
                                    "not rewritten).")
    rm.add_argument("ids", nargs="+", help="item ids")
    rm.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                    help="the trained run (default: %(default)s)")

    cp = sub.add_parser("compact", help="fold added and removed products into a new base index",
                        description="Rewrite a run's index as one file holding its live "
                                    "products (and rebuild its HNSW graph, if it has one), "
                                    "atomically; loading is then as fast as after training.")
    cp.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                    help="the trained run (default: %(default)s)")
    _output_options(cp)

    ix = sub.add_parser("index", help="choose how a trained run is searched (exact or HNSW)",
                        description="Build (or drop) the FAISS HNSW graph of a trained run "
                                    "without retraining, and record the choice in run.json.")
    ix.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                    help="the trained run (default: %(default)s)")
    _search_options(ix, d, required=True)
    _output_options(ix)

    e = sub.add_parser("evaluate", help="retrieval quality and head accuracy of a trained run",
                       description="Score a run. Fashion-MNIST: every catalog item as a "
                                   "query (leave-one-out) and held-out test images. Product "
                                   "catalogs: the held-out products (test/ of split folders, "
                                   "or --holdout at training) against the whole catalog, "
                                   "beside the raw backbone features with cosine; without "
                                   "held-out products, leave-one-out (optimistic). "
                                   "precision@k, recall@k, mAP@10, 1-NN accuracy, per class; "
                                   "the head's accuracy and confusion matrix.")
    e.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="the trained run (default: %(default)s)")
    e.add_argument("--n-heldout", type=_non_negative, default=None,
                   help="Fashion-MNIST runs: held-out queries, the test images after the "
                        "catalog (default: all)")
    e.add_argument("--out", default=None,
                   help="JSON to write (default: RUN_DIR/evaluation.json)")
    _output_options(e)

    sv = sub.add_parser("serve", help="the recommendation service: HTTP API and web page",
                        description="Serve a trained run over HTTP (FastAPI + uvicorn): the "
                                    "JSON API under /api (docs at /docs), metrics at "
                                    "/metrics, the page at /. Stops on Ctrl-C or SIGTERM.")
    sv.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                    help="the trained run (default: %(default)s)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=_int_at_least(0), default=8000,
                    help="port (default: %(default)s)")
    sv.add_argument("--api-key-file", default=None,
                    help="file holding the API key that writes (add, remove) need; "
                         "default: the FASHIONREC_API_KEY variable; neither: writes are off")
    sv.add_argument("--cors-origin", action="append", default=[],
                    help="an origin allowed to call the API from a browser (repeatable; "
                         "default: none)")
    sv.add_argument("--workers", type=_positive, default=1,
                    help="processes serving the port, each with its own model "
                         "(default: %(default)s)")
    sv.add_argument("--max-upload-mb", type=float, default=10.0,
                    help="largest upload in MB (default: %(default)s)")
    sv.add_argument("--max-batch", type=_positive, default=16,
                    help="photo queries answered by one backbone call (default: %(default)s)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="longest a photo query waits for others to join its batch "
                         "(default: %(default)s)")

    pl = sub.add_parser("plot", help="training accuracy and loss curves as PNG",
                        description="Plot the head's accuracy and loss curves.")
    pl.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                    help="the trained run (default: %(default)s)")
    pl.add_argument("--out", default=None,
                    help="PNG to write (default: RUN_DIR/plots/curves.png)")
    return p


def _view_options(c):
    """How catalog products are kept and seen (train and extract)."""
    c.add_argument("--min-class-size", type=_positive, default=CATALOG_OPTIONS["min_class_size"],
                   help="classes with fewer readable images are left out and reported "
                        "(default: %(default)s)")
    c.add_argument("--image-fit", default=CATALOG_OPTIONS["image_fit"],
                   help=f"how a photo is fitted to the square input: {', '.join(FITS)} "
                        f"(white letterbox, centre square, stretch), or several joined by "
                        f"'+', each one more view of the product (default: "
                        f"{CATALOG_DEFAULTS['image_fit']})")
    c.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   default=CATALOG_OPTIONS["flip"],
                   help=f"also see each photo mirrored (training and queries) (default: "
                        f"{'on' if CATALOG_DEFAULTS['flip'] else 'off'})")



def _output_options(parser):
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow's and the engines' own log lines")


def _backbone_options(t, d):
    """What decides a run's features: shared by train and extract."""
    t.add_argument("--image-size", type=_positive, default=d["image_size"].default,
                   help="backbone input side in pixels, >= 32 (default: %(default)s)")
    t.add_argument("--extract-batch-size", type=_positive,
                   default=d["extract_batch_size"].default,
                   help="images per backbone call during extraction (default: %(default)s)")
    t.add_argument("--weights", default=d["weights"].default,
                   help="imagenet (Keras cache or checked download; falls back to the "
                        "../shared stage-4 stand-in), none (random) or a Keras weights file "
                        "(default: %(default)s)")
    t.add_argument("--backbone", default=d["backbone"].default,
                   help="resnet50, or a saved .keras model mapping (N,H,W,3) images to "
                        "(N,D) vectors (default: %(default)s)")
    t.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="how the backbone's last feature map becomes a vector: avg (global "
                        "average) or gem (generalized mean, p=3) (default: "
                        f"{RECIPE_DEFAULTS['pooling']}; product catalogs "
                        f"{CATALOG_DEFAULTS['pooling']})")
    t.add_argument("--engine", choices=ENGINES, default=d["engine"].default,
                   help="what runs the backbone: keras, openvino (pip install "
                        "'fashionrec[openvino]') or auto: OpenVINO where installed and the CPU "
                        "has native bfloat16, else Keras (default: %(default)s)")
    t.add_argument("--precision", choices=PRECISIONS, default=d["precision"].default,
                   help="the backbone's arithmetic: float32, bfloat16, or auto: bfloat16 "
                        "with OpenVINO on a CPU with native bfloat16, else float32 "
                        "(default: %(default)s)")
    t.add_argument("--seed", type=int, default=d["seed"].default,
                   help="random seed (default: %(default)s)")


def _search_options(parser, d, required=False):
    g = parser.add_argument_group("search")
    g.add_argument("--search", choices=SEARCH_CHOICES, required=required,
                   default=None if required else d["search"].default,
                   help="exact, hnsw (FAISS HNSW graph, approximate; pip install "
                        "'fashionrec[ann]') or auto (hnsw from --hnsw-min-items items up)" +
                        ("" if required else " (default: %(default)s)"))
    g.add_argument("--hnsw-min-items", type=_positive, default=None if required else
                   d["hnsw_min_items"].default,
                   help="auto: smallest catalog searched with HNSW (default: "
                        f"{'the run' + chr(39) + 's' if required else d['hnsw_min_items'].default})")
    for name, what in (("hnsw_m", "links per node"),
                       ("hnsw_ef_construction", "search list while building"),
                       ("hnsw_ef_search", "search list per query")):
        g.add_argument(f"--{name.replace('_', '-')}", type=_positive,
                       default=None if required else d[name].default,
                       help=f"HNSW {what} (default: "
                            f"{'the run' + chr(39) + 's' if required else d[name].default})")


def _search_kwargs(args):
    return {k: getattr(args, k) for k in ("search", "hnsw_min_items", "hnsw_m",
                                          "hnsw_ef_construction", "hnsw_ef_search")}


CATALOG_OPTIONS = {"label_depth": 1, "label_column": "label", "id_column": "id",
                    "image_column": None, "image_pattern": "images/{id}.jpg",
                    "category_columns": None, "min_class_size": 5, "holdout": None,
                    "image_fit": None, "flip": None, "train_on": "train"}


def _catalog_options(group, defaults=True):
    """The layout options of a catalog folder or CSV (for train and add; ``add`` has no
    defaults of its own: the run's options apply)."""
    def default(value):
        return value if defaults else None
    group.add_argument("--label-depth", type=_positive, default=default(CATALOG_OPTIONS["label_depth"]),
                       help="folder layout: folder levels that make the class "
                            "(1: Shoes, 2: Shoes/Boots)" + (" (default: 1)" if defaults else ""))
    group.add_argument("--label-column", default=default(CATALOG_OPTIONS["label_column"]),
                       help="CSV: the column holding the class" +
                            (" (default: label)" if defaults else ""))
    group.add_argument("--id-column", default=default(CATALOG_OPTIONS["id_column"]),
                       help="CSV: the column holding the id" + (" (default: id)" if defaults else ""))
    group.add_argument("--image-column", default=None,
                       help="CSV: a column holding the image path (else --image-pattern)")
    group.add_argument("--image-pattern", default=default(CATALOG_OPTIONS["image_pattern"]),
                       help="CSV: image path from the id" +
                            (" (default: images/{id}.jpg)" if defaults else ""))
    group.add_argument("--category-columns", default=None,
                       help="CSV: comma-separated columns joined into the category path "
                            "(default: the label column)")


def _catalog_kwargs(args):
    return {k: getattr(args, k) for k in ("label_depth", "label_column", "id_column",
                                          "image_column", "image_pattern", "category_columns")}


def cmd_train(args):
    from .plots import plot_history
    from .recommend import Recommender

    if args.catalog is not None:
        return _train_catalog(args)
    given = [f"--{k.replace('_', '-')}" for k, v in CATALOG_OPTIONS.items()
             if getattr(args, k) != v]
    if given:
        raise FashionrecError(f"{', '.join(given)} appl(ies) only with --catalog")

    cfg = RunConfig(
        dataset=args.dataset, data_dir=args.data_dir, n_train=args.n_train,
        n_reco=args.n_reco, image_size=args.image_size, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, dropout=args.dropout,
        pooling=args.pooling, weights=args.weights,
        backbone=args.backbone, engine=args.engine, precision=args.precision,
        extract_batch_size=args.extract_batch_size, seed=args.seed, **_search_kwargs(args),
    )
    run_dir = Path(args.run_dir)
    print(f"fashionrec train: {cfg.dataset}, {cfg.n_train} training images, "
          f"{cfg.n_reco} catalog images, {cfg.image_size} px -> {run_dir}", flush=True)
    rec = Recommender(cfg).fit(cache_dir=run_dir / "features", progress=not args.no_progress)
    rec.save(run_dir)
    curves = plot_history(rec.head_.history_, run_dir / "plots" / "curves.png")
    t = rec.metadata_["timings"]
    print(f"backbone:       {rec.metadata_['backbone_description']}")
    print(f"head accuracy:  {rec.metadata_['head_test_accuracy']:.4f} "
          f"(first {cfg.n_reco} test images)")
    print(f"timings:        extract {t['extract_s']:.1f} s, head {t['head_s']:.1f} s, "
          f"index {t['index_s']:.1f} s, total {t['total_s']:.1f} s, "
          f"peak RSS {t['peak_rss_mb']:.0f} MB")
    print(f"run:            {run_dir / 'run.json'} (metadata)")
    print(f"head:           {run_dir / 'head.keras'}, {run_dir / 'head.json'}")
    print(f"index:          {run_dir / 'index.h5'} ({_describe_search(rec.search_spec)})")
    print(f"features cache: {run_dir / 'features'}")
    print(f"curves:         {curves}")
    return 0


def _train_catalog(args):
    from .catalog import Catalog
    from .plots import plot_history
    from .recommend import REPORT_FILE, Recommender

    d = RunConfig.__dataclass_fields__
    clash = [f"--{name.replace('_', '-')}" for name in ("dataset", "data_dir", "n_train", "n_reco")
             if getattr(args, name) != d[name].default]
    if clash:
        raise FashionrecError(f"{', '.join(clash)} do(es) not apply to --catalog: every "
                              f"readable product trains the head and is indexed")
    cfg = RunConfig(
        image_size=args.image_size, image_fit=args.image_fit, flip=args.flip,
        epochs=args.epochs, learning_rate=args.learning_rate, pooling=args.pooling,
        batch_size=args.batch_size, dropout=args.dropout, weights=args.weights,
        backbone=args.backbone, engine=args.engine, precision=args.precision,
        extract_batch_size=args.extract_batch_size, seed=args.seed, train_on=args.train_on,
        **_search_kwargs(args),
    )
    run_dir = Path(args.run_dir)
    catalog = Catalog.read(args.catalog, **_catalog_kwargs(args))
    print(f"fashionrec train: catalog {args.catalog} ({catalog.source['layout']}, "
          f"{len(catalog)} listed images), {cfg.image_size} px -> {run_dir}", flush=True)
    rec = Recommender(cfg).fit_catalog(catalog, min_class_size=args.min_class_size,
                                       holdout=args.holdout, cache_dir=run_dir / "features",
                                       progress=not args.no_progress)
    rec.save(run_dir)
    curves = plot_history(rec.head_.history_, run_dir / "plots" / "curves.png")
    t = rec.metadata_["timings"]
    val = rec.metadata_.get("head_val_accuracy")
    print(f"backbone:       {rec.metadata_['backbone_description']}")
    print(f"catalog:        {len(rec.index_)} products, {len(rec.class_names)} classes "
          f"({rec.report_['n_skipped']} skipped: {run_dir / REPORT_FILE})")
    split = rec.metadata_["dataset"]["split"]
    if split["method"] != "none":
        print(f"split:          {split['train']} train, {split['validation']} validation, "
              f"{split['heldout']} held out ({split['method']}; {run_dir / 'split.json'})")
    if val is not None:
        where = ("validation/" if split["validation"] else
                 f"{cfg.validation_split:.0%} of the training products")
        print(f"head accuracy:  {val:.4f} (validation: {where})")
    held = rec.metadata_.get("head_heldout_accuracy")
    if held is not None:
        print(f"head accuracy:  {held:.4f} (the {split['heldout']} held-out products; "
              f"`fashionrec evaluate` for retrieval)")
    print(f"timings:        extract {t['extract_s']:.1f} s, head {t['head_s']:.1f} s, "
          f"total {t['total_s']:.1f} s, peak RSS {t['peak_rss_mb']:.0f} MB")
    print(f"run:            {run_dir / 'run.json'}; index {run_dir / 'index.h5'} "
          f"({_describe_search(rec.search_spec)})")
    print(f"curves:         {curves}")
    return 0


def cmd_extract(args):
    from .catalog import Catalog
    from .recommend import Recommender

    cfg = RunConfig(
        image_size=args.image_size, image_fit=args.image_fit, flip=args.flip,
        pooling=args.pooling, weights=args.weights, backbone=args.backbone,
        engine=args.engine, precision=args.precision,
        extract_batch_size=args.extract_batch_size, seed=args.seed)
    run_dir = Path(args.run_dir)
    catalog = Catalog.read(args.catalog, **_catalog_kwargs(args))
    runner = None
    if args.ray is not None:
        from .distributed import RayExtractor

        runner = RayExtractor(None if args.ray == "local" else args.ray,
                              workers=args.ray_workers, verbose=args.verbose)
    where = "here" if runner is None else f"on Ray ({runner.describe()})"
    print(f"fashionrec extract: catalog {args.catalog} ({len(catalog)} listed images), "
          f"{cfg.image_size} px, {where} -> {run_dir / 'features'}", flush=True)
    try:
        out = Recommender(cfg).extract_catalog(
            catalog, min_class_size=args.min_class_size, cache_dir=run_dir / "features",
            progress=not args.no_progress, runner=runner)
    finally:
        if runner is not None:
            runner.close()
    print(f"features:       {out['n_items']} products, {len(out['files'])} view file(s) in "
          f"{run_dir / 'features'}")
    if out["n_failed"]:
        print(f"unreadable:     {out['n_failed']} image(s), left out at training: "
              + ", ".join(list(out["failed"])[:5]))
    print(f"next:           fashionrec train --catalog {args.catalog} --run-dir {run_dir} "
          f"(same options) uses them")
    return 0


def _slug(text):
    return re.sub(r"[^A-Za-z0-9-]+", "_", str(text)).strip("_") or "query"


def cmd_recommend(args):
    from .plots import plot_recommendation
    from .recommend import Recommender

    rec = Recommender.load(args.run_dir)
    filters = dict(k=args.k, same_class=args.same_class, category=args.category)
    if args.item is not None:
        result = rec.recommend(item=args.item, **filters)
        name = f"item-{_slug(args.item)}"
    elif args.idx is not None:
        result = rec.recommend(args.idx, **filters)
        name = f"idx{args.idx}"
    else:
        result = rec.recommend(args.image, **filters)
        name = _slug(Path(args.image).stem)
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots" / f"recommend-{name}.png"
    plot_recommendation(result, result.image, rec.item_image, out)
    if args.json:
        print(json.dumps({**result.to_dict(), "png": str(out)}, indent=2))
    else:
        print(result.format_text())
        print(f"png: {out}")
    return 0


def cmd_add(args):
    from .catalog import Catalog, format_skipped
    from .recommend import Recommender

    if args.id is not None and (args.image is None or len(args.image) != 1):
        raise FashionrecError("--id names a single --image")
    rec = Recommender.load(args.run_dir)
    if args.catalog is not None:
        if args.label is not None:
            raise FashionrecError("--label applies to --image; a catalog has its own classes")
        catalog = rec.read_catalog(args.catalog, **_catalog_kwargs(args))
    else:
        catalog = Catalog.from_files(
            args.image, ids=None if args.id is None else [args.id],
            labels=None if args.label is None else [args.label] * len(args.image))
    report = rec.add(catalog, progress=not args.no_progress,
                     log=None if args.json else print)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in report["added"][:20]:
            print(f"  + {item['id']}: {item['class']} ({item['class_from']})")
        if len(report["added"]) > 20:
            print(f"  ... and {len(report['added']) - 20} more")
        print("\n".join(format_skipped(report["skipped"])))
    return 0 if report["n_added"] or not report["skipped"] else 1


def cmd_remove(args):
    from .recommend import Recommender

    Recommender.load(args.run_dir).remove(args.ids)
    return 0


def _describe_search(spec):
    if spec["backend"] == "hnsw":
        return (f"HNSW search: M={spec['m']}, efConstruction={spec['ef_construction']}, "
                f"efSearch={spec['ef_search']}")
    return "exact search"


def cmd_compact(args):
    from .recommend import Recommender

    rec = Recommender.load(args.run_dir)
    rec.compact(progress=not args.no_progress)
    print(f"index: {len(rec.index_)} items in {Path(args.run_dir) / 'index.h5'} "
          f"({_describe_search(rec.search_spec)})")
    return 0


def cmd_index(args):
    from .recommend import Recommender

    rec = Recommender.load(args.run_dir)
    params = _search_kwargs(args)
    spec = rec.reindex(params.pop("search"), progress=not args.no_progress, **params)
    pending = rec.index_.metadata.get("n_updates", 0)
    print(f"index: {len(rec.index_)} items, {_describe_search(spec)}; recorded in "
          f"{Path(args.run_dir) / 'run.json'}")
    if pending and spec["backend"] == "hnsw":
        print(f"note: products added since training are searched exactly until "
              f"`fashionrec compact --run-dir {args.run_dir}` folds {pending} update(s) in")
    return 0


def cmd_serve(args):
    try:
        from .serve import ServeSettings, run
    except ImportError as exc:
        raise FashionrecError(f"serve needs its extra: pip install 'fashionrec[serve]' "
                              f"({exc.name} is missing)") from None
    key = os.environ.get("FASHIONREC_API_KEY") or None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise FashionrecError(f"API key file {args.api_key_file} is empty")
    if not args.max_upload_mb > 0 or not args.max_wait_ms >= 0:
        raise FashionrecError("--max-upload-mb must be > 0 and --max-wait-ms >= 0")
    settings = ServeSettings(run_dir=args.run_dir, api_key=key,
                             cors_origins=tuple(args.cors_origin),
                             max_upload_bytes=int(args.max_upload_mb * 2**20),
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    run(settings, host=args.host, port=args.port, workers=args.workers,
        log=lambda message: print(message, flush=True))
    print("fashionrec serve: stopped", flush=True)
    return 0


def cmd_evaluate(args):
    from .artifacts import write_json
    from .evaluate import evaluate, format_table
    from .plots import plot_confusion, plot_per_class
    from .recommend import Recommender

    run_dir = Path(args.run_dir)
    rec = Recommender.load(run_dir)
    result = evaluate(rec, n_heldout=args.n_heldout, cache_dir=run_dir / "features",
                      progress=not args.no_progress)
    out = Path(args.out) if args.out else run_dir / "evaluation.json"
    write_json(out, result)
    print(format_table(result))
    print(f"json:       {out}")
    print(f"per class:  {plot_per_class(result, run_dir / 'plots' / 'per_class.png')}")
    print(f"confusion:  {plot_confusion(result, run_dir / 'plots' / 'confusion.png')}")
    return 0


def cmd_plot(args):
    from .artifacts import read_json
    from .plots import plot_history

    run_dir = Path(args.run_dir)
    if not (run_dir / "head.json").is_file():
        raise FashionrecError(f"no trained run in {run_dir}; run `make train` first")
    history = read_json(run_dir / "head.json", "head file").get("history")
    if not history:
        raise FashionrecError(f"{run_dir / 'head.json'} holds no training history")
    out = Path(args.out) if args.out else run_dir / "plots" / "curves.png"
    print(f"curves: {plot_history(history, out)}")
    return 0


COMMANDS = {"train": cmd_train, "extract": cmd_extract, "recommend": cmd_recommend,
            "add": cmd_add, "remove": cmd_remove, "compact": cmd_compact, "index": cmd_index,
            "evaluate": cmd_evaluate, "plot": cmd_plot, "serve": cmd_serve}


def quiet(verbose=False):
    """Keep the output to what a user needs: TensorFlow's start-up lines (written by its
    C++ libraries straight to the process's stderr while it is imported and looks for
    devices, whatever ``TF_CPP_MIN_LOG_LEVEL`` says), its retracing warnings and library
    warnings are hidden unless ``verbose``. A Python error while importing still
    surfaces."""
    if verbose:
        return
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # one set by the user is kept
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401  (imports TensorFlow, the Keras backend)
        import tensorflow as tf

        # device discovery: where there is no GPU, CUDA's "failed call to cuInit" comes here
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(argv=None):
    args = build_parser().parse_args(argv)
    quiet(getattr(args, "verbose", False))
    try:
        return COMMANDS[args.command](args)
    except (FashionrecError, OSError) as exc:  # OSError: e.g. an --out folder not writable
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; files already saved are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
