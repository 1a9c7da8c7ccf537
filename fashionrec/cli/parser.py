"""The command line's grammar: ``build_parser()``, one small function per sub-command,
the option groups sub-commands share, and the argparse types they use."""

from __future__ import annotations

import argparse

from ..config import (
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
from ..lean import ENGINE_PATHS
from ..rundir import RunDir

DESCRIPTION = ("fashionrec train | extract | recommend | add | remove | compact | index | "
               "evaluate | plot | serve — a thin layer over the library.")
DEFAULT_RUN_DIR = "runs/default"
SEARCH_NAMES = ("search", "hnsw_min_items", "hnsw_m", "hnsw_ef_construction",
                "hnsw_ef_search", "qe_k", "qe_alpha")
DBA_NAMES = ("dba_k", "dba_alpha")  # chosen at training: they decide the stored vectors
CATALOG_LAYOUT = ("label_depth", "label_column", "id_column", "image_column",
                  "image_pattern", "category_columns", "allow_outside", "attribute_columns",
                  "attributes_file")
CATALOG_OPTIONS = {"label_depth": 1, "label_column": "label", "id_column": "id",
                   "image_column": None, "image_pattern": "images/{id}.jpg",
                   "category_columns": None, "allow_outside": False,
                   "attribute_columns": None, "attributes_file": None, "min_class_size": 5, "holdout": None,
                   "image_fit": None, "flip": None, "train_on": "train"}
_FIELDS = RunConfig.__dataclass_fields__
_RUN = RunDir("RUN_DIR")  # the run folder's paths as help texts name them


def _default(name):
    """A RunConfig field's default."""
    return _FIELDS[name].default


# ---------------------------------------------------------------- argparse types
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
_nonnegative = _int_at_least(0)
_non_negative = _int_at_least(0)


def _share(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share such as 0.2, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1), got {text}")
    return value


# ---------------------------------------------------------------- the parser
def build_parser():
    p = _Parser(prog="fashionrec", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_train, _extract, _recommend, _add, _remove, _compact, _index, _evaluate,
                _serve, _plot):
        add(sub)
    return p


def _train(sub):
    t = sub.add_parser("train", help="extract features, train the head, build the catalog index",
                       description="Run the whole pipeline and save the run under --run-dir.")
    t.add_argument("--dataset", choices=DATASET_NAMES, default=_default("dataset"),
                   help="which dataset (default: %(default)s)")
    t.add_argument("--data-dir", default=None,
                   help="folder searched first for the four IDX .gz files (then data/, "
                        "~/.keras/datasets, ../shared/datasets, then a checked download)")
    t.add_argument("--n-train", type=_positive, default=_default("n_train"),
                   help="first N training images train the head (default: %(default)s)")
    t.add_argument("--n-reco", type=_positive, default=_default("n_reco"),
                   help="first N test images form the catalog (default: %(default)s)")
    _head_options(t)
    _backbone_options(t)
    _run_dir_option(t, "where the run's files go (default: %(default)s)")
    t.add_argument("--force", action="store_true",
                   help="train into a non-empty folder that holds no fashionrec run (its "
                        "files may be overwritten)")
    _output_options(t)
    _search_options(t)
    _store_options(t, "where the catalog lives: the run's files (default), or Milvus "
                      "(--milvus-uri, --collection; catalog runs); a retrain of a run in "
                      "Milvus publishes there")
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


def _extract(sub):
    x = sub.add_parser(
        "extract", help="only extract a catalog's features into a run's feature cache",
        description=f"Extract the backbone features of a catalog (every view) into "
                    f"{_RUN.features}, here or across machines with Ray; a following "
                    "`fashionrec train --catalog` with the same options uses them. A killed "
                    "extraction resumes where it stopped.")
    x.add_argument("--catalog", required=True,
                   help="an image folder or a CSV manifest (as for train)")
    _catalog_options(x)
    _view_options(x)
    _backbone_options(x)
    x.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="extract on Ray Data (pip install 'fashionrec[ray]'): no ADDRESS "
                        "starts a local Ray; 'auto' or ray://HOST:PORT joins a cluster")
    x.add_argument("--ray-workers", type=_positive, default=None,
                   help="Ray actors, one model each (default: local Ray 2, a cluster: "
                        "its CPUs / 4)")
    _run_dir_option(x, "the run whose feature cache is filled (default: %(default)s)")
    _output_options(x)


def _recommend(sub):
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
    r.add_argument("--where", default=None, metavar="FILTER",
                   help="only items whose attributes match, e.g. 'gender == \"Women\" and "
                        "price < 50 and baseColour in [\"Red\", \"Pink\"]' (==, !=, <, <=, "
                        ">, >=, in [..], and, or, not, parentheses)")
    _run_dir_option(r)
    r.add_argument("--out", default=None,
                   help=f"PNG to write (default: {_RUN.plot('recommend-<query>')})")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add(sub):
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
    a.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="an attribute of the --image products (repeatable), e.g. --attr "
                        "price=39.5 --attr gender=Women; the run's attribute schema applies")
    _catalog_options(a, defaults=False)
    _run_dir_option(a)
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    _output_options(a)


def _remove(sub):
    rm = sub.add_parser("remove", help="remove discontinued products from a run's index",
                        description="Remove items by id (all or nothing; the index file is "
                                    "not rewritten).")
    rm.add_argument("ids", nargs="+", help="item ids")
    _run_dir_option(rm)


def _compact(sub):
    _run_command(sub, "compact", "fold added and removed products into a new base index",
                 "Rewrite a run's index as one file holding its live products (and rebuild "
                 "its HNSW graph, if it has one), atomically; loading is then as fast as "
                 "after training.")


def _index(sub):
    _run_command(sub, "index", "choose how a trained run is searched (exact or HNSW)",
                 "Build (or drop) the FAISS HNSW graph of a trained run without retraining, "
                 f"and record the choice in {_RUN.run_file.name}.", search=True)


def _store_options(p, text):
    g = p.add_argument_group("catalog store")
    g.add_argument("--store", choices=("file", "milvus"), default=None, help=text)
    g.add_argument("--milvus-uri", default=None, metavar="URI",
                   help="a Milvus Lite .db file or http://host:19530 (credentials: "
                        "FASHIONREC_MILVUS_TOKEN or FASHIONREC_MILVUS_TOKEN_FILE)")
    g.add_argument("--collection", default=None,
                   help="the Milvus collection alias the catalog is read through")


def _run_command(sub, name, summary, description, search=False):
    """A verb that works on a trained run (``--run-dir``, progress options)."""
    p = sub.add_parser(name, help=summary, description=description)
    _run_dir_option(p)
    if search:
        _search_options(p, required=True)
        _store_options(p, "move the catalog: into Milvus (a new collection behind the "
                          "alias --collection, at --milvus-uri) or back into the run's files")
    _output_options(p)
    return p


def _evaluate(sub):
    e = sub.add_parser("evaluate", help="retrieval quality and head accuracy of a trained run",
                       description="Score a run. Fashion-MNIST: every catalog item as a "
                                   "query (leave-one-out) and held-out test images. Product "
                                   "catalogs: the held-out products (test/ of split folders, "
                                   "or --holdout at training) against the whole catalog, "
                                   "beside the raw backbone features with cosine; without "
                                   "held-out products, leave-one-out (optimistic). "
                                   "precision@k, recall@k, mAP@10, 1-NN accuracy, per class; "
                                   "the head's accuracy and confusion matrix.")
    _run_dir_option(e)
    e.add_argument("--n-heldout", type=_non_negative, default=None,
                   help="Fashion-MNIST runs: held-out queries, the test images after the "
                        "catalog (default: all)")
    e.add_argument("--out", default=None,
                   help=f"JSON to write (default: {_RUN.evaluation})")
    _output_options(e)


def _serve(sub):
    sv = sub.add_parser("serve", help="the recommendation service: HTTP API and web page",
                        description="Serve a trained run over HTTP (FastAPI + uvicorn): the "
                                    "JSON API under /api (docs at /docs), metrics at "
                                    "/metrics, the page at /. Stops on Ctrl-C or SIGTERM.")
    _run_dir_option(sv)
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
    sv.add_argument("--engine-path", choices=ENGINE_PATHS, default=None,
                    help="auto: an OpenVINO run is served without TensorFlow (its NumPy "
                         "head and OpenVINO IR backbone; runs saved before them load as "
                         "before); keras: always the Keras head and TensorFlow (default: "
                         "the FASHIONREC_ENGINE_PATH variable, else auto)")
    for flag, kind, default, text in _SERVE_LIMITS:
        sv.add_argument(flag, type=kind, default=default,
                        help=f"{text} (default: %(default)s)")


# the service's limits: option, type, default, what it bounds
_SERVE_LIMITS = (
    ("--max-upload-mb", float, 10.0, "largest upload in MB"),
    ("--max-batch", _positive, 16, "photo queries answered by one backbone call"),
    ("--max-wait-ms", float, 5.0, "longest a photo query waits for others to join its batch"),
    ("--max-queue", _positive, 64, "photo queries waiting for a batch; beyond, 503 with "
                                   "Retry-After"),
    ("--photo-timeout-s", float, 30.0, "longest a photo query waits for its answer; then 504"),
    ("--max-megapixels", float, 40.0, "largest uploaded photo in megapixels, read from its "
                                      "header; above, 413 (at most 40)"),
    ("--max-connections", _int_at_least(2), 256, "open connections per worker process from "
                                                 "which new requests get 503 (uvicorn's "
                                                 "limit_concurrency)"),
    ("--compact-segments", _int_at_least(0), 64, "added segments from which a write "
                                                 "compacts the catalog in the background "
                                                 "(0: never)"),
    ("--compact-removed-share", float, 0.2, "share of removed items from which a write "
                                            "compacts the catalog (0: never)"),
    ("--display-cache-mb", float, 64.0, "item pictures kept encoded in memory for the "
                                        "image route"),
)


def _plot(sub):
    pl = sub.add_parser("plot", help="training accuracy and loss curves as PNG",
                        description="Plot the head's accuracy and loss curves.")
    _run_dir_option(pl)
    pl.add_argument("--out", default=None,
                    help=f"PNG to write (default: {_RUN.plot('curves')})")


# ---------------------------------------------------------------- shared options
def _run_dir_option(parser, help="the trained run (default: %(default)s)"):
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=help)


def _output_options(parser):
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow's and the engines' own log lines")


def _head_options(t):
    """How the head is trained (train only)."""
    t.add_argument("--epochs", type=_positive, default=None,
                   help=f"head training epochs (default: {RECIPE_DEFAULTS['epochs']}; "
                        f"product catalogs {CATALOG_DEFAULTS['epochs']})")
    t.add_argument("--learning-rate", type=float, default=None,
                   help=f"the head's Adam learning rate (default: "
                        f"{RECIPE_DEFAULTS['learning_rate']:g}; product catalogs "
                        f"{CATALOG_DEFAULTS['learning_rate']:g})")
    t.add_argument("--batch-size", type=_positive, default=_default("batch_size"),
                   help="head training batch size (default: %(default)s)")
    t.add_argument("--dropout", type=float, default=_default("dropout"),
                   help="the head's dropout rate (default: %(default)s)")
    t.add_argument("--metric-loss", choices=("multi_similarity", "supcon"), default=None,
                   help="also train dense_mid with a metric-learning loss beside the "
                        "softmax (default: none, the recipe)")
    t.add_argument("--metric-weight", type=float, default=_default("metric_weight"),
                   help="the metric loss's weight against the softmax (default: "
                        "%(default)s)")
    t.add_argument("--dba-k", type=_nonnegative, default=_default("dba_k"),
                   help="database-side augmentation: each stored vector averaged with its "
                        "K nearest catalog items (default: %(default)s, off)")
    t.add_argument("--fine-tune-blocks", type=_nonnegative,
                   default=_default("fine_tune_blocks"),
                   help="product catalogs: unfreeze the last N residual blocks of the "
                        "backbone and train them first (default: %(default)s, frozen)")
    t.add_argument("--fine-tune-epochs", type=_positive, default=_default("fine_tune_epochs"),
                   help="epochs of that fine-tuning (default: %(default)s)")
    t.add_argument("--fine-tune-learning-rate", type=float,
                   default=_default("fine_tune_learning_rate"),
                   help="its Adam learning rate (default: %(default)s)")
    t.add_argument("--dba-alpha", type=float, default=_default("dba_alpha"),
                   help="DBA neighbour weight: cosine ** alpha (default: %(default)s)")


def _backbone_options(t):
    """What decides a run's features: shared by train and extract."""
    t.add_argument("--image-size", type=_positive, default=_default("image_size"),
                   help="backbone input side in pixels, >= 32 (default: %(default)s)")
    t.add_argument("--extract-batch-size", type=_positive,
                   default=_default("extract_batch_size"),
                   help="images per backbone call during extraction (default: %(default)s)")
    t.add_argument("--weights", default=_default("weights"),
                   help="imagenet (Keras cache or checked download; falls back to the "
                        "../shared stage-4 stand-in), none (random) or a Keras weights file "
                        "(default: %(default)s)")
    t.add_argument("--backbone", default=_default("backbone"),
                   help="resnet50, or a saved .keras model mapping (N,H,W,3) images to "
                        "(N,D) vectors (default: %(default)s)")
    t.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="how the backbone's last feature map becomes a vector: avg (global "
                        "average) or gem (generalized mean, p=3) (default: "
                        f"{RECIPE_DEFAULTS['pooling']}; product catalogs "
                        f"{CATALOG_DEFAULTS['pooling']})")
    t.add_argument("--engine", choices=ENGINES, default=_default("engine"),
                   help="what runs the backbone: keras, openvino (pip install "
                        "'fashionrec[openvino]') or auto: OpenVINO where installed and the CPU "
                        "has native bfloat16, else Keras (default: %(default)s)")
    t.add_argument("--precision", choices=PRECISIONS, default=_default("precision"),
                   help="the backbone's arithmetic: float32, bfloat16, or auto: bfloat16 "
                        "with OpenVINO on a CPU with native bfloat16, else float32 "
                        "(default: %(default)s)")
    t.add_argument("--seed", type=int, default=_default("seed"),
                   help="random seed (default: %(default)s)")


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


def _search_options(parser, required=False):
    """How the catalog is searched (train; index, where they are required)."""
    g = parser.add_argument_group("search")
    g.add_argument("--search", choices=SEARCH_CHOICES,  # index: --search or --store
                   default=None if required else _default("search"),
                   help="exact, hnsw (FAISS HNSW graph, approximate; pip install "
                        "'fashionrec[ann]') or auto (hnsw from --hnsw-min-items items up)" +
                        ("" if required else " (default: %(default)s)"))
    g.add_argument("--hnsw-min-items", type=_positive, default=None if required else
                   _default("hnsw_min_items"),
                   help="auto: smallest catalog searched with HNSW (default: "
                        f"{'the run' + chr(39) + 's' if required else _default('hnsw_min_items')})")
    for name, what in (("hnsw_m", "links per node"),
                       ("hnsw_ef_construction", "search list while building"),
                       ("hnsw_ef_search", "search list per query")):
        g.add_argument(f"--{name.replace('_', '-')}", type=_positive,
                       default=None if required else _default(name),
                       help=f"HNSW {what} (default: "
                            f"{'the run' + chr(39) + 's' if required else _default(name)})")
    g.add_argument("--qe-k", type=_nonnegative, default=None if required else _default("qe_k"),
                   help="query expansion: each query averaged with its K nearest catalog "
                        "items before the search; 0: off (default: " +
                        ("the run's)" if required else "%(default)s)"))
    g.add_argument("--qe-alpha", type=float, default=None if required else
                   _default("qe_alpha"), help="query expansion neighbour weight: cosine ** "
                   "alpha (default: " + ("the run's)" if required else "%(default)s)"))


def _catalog_options(group, defaults=True):
    """The layout options of a catalog folder or CSV (for train and add; ``add`` has no
    defaults of its own: the run's options apply)."""
    def default(value):
        return value if defaults else None
    group.add_argument("--label-depth", type=_positive,
                       default=default(CATALOG_OPTIONS["label_depth"]),
                       help="folder layout: folder levels that make the class "
                            "(1: Shoes, 2: Shoes/Boots)" + (" (default: 1)" if defaults else ""))
    group.add_argument("--label-column", default=default(CATALOG_OPTIONS["label_column"]),
                       help="CSV: the column holding the class" +
                            (" (default: label)" if defaults else ""))
    group.add_argument("--id-column", default=default(CATALOG_OPTIONS["id_column"]),
                       help="CSV: the column holding the id" +
                            (" (default: id)" if defaults else ""))
    group.add_argument("--image-column", default=None,
                       help="CSV: a column holding the image path (else --image-pattern)")
    group.add_argument("--image-pattern", default=default(CATALOG_OPTIONS["image_pattern"]),
                       help="CSV: image path from the id" +
                            (" (default: images/{id}.jpg)" if defaults else ""))
    group.add_argument("--category-columns", default=None,
                       help="CSV: comma-separated columns joined into the category path "
                            "(default: the label column)")
    group.add_argument("--attributes", dest="attribute_columns", default=None,
                       metavar="COLS",
                       help="CSV: comma-separated columns kept as product attributes, "
                            "'none' for none (default: every column but the id, label and "
                            "image ones)")
    group.add_argument("--attributes-file", default=None, metavar="FILE",
                       help="folder: a CSV (with an id column) or JSON-lines file of the "
                            "products' attributes by id (an id is the image's path below "
                            "the folder)")
    group.add_argument("--allow-outside", action="store_true",
                       help="let a catalog name images outside its folder (a CSV's "
                            "absolute paths, .. and symlinks leading out; a folder's "
                            "symlinks leading out; the service shows every catalog image)")
