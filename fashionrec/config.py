"""Run configuration (the seed recipe's defaults) and where to look for local files."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from . import expansion, metric
from .errors import FashionrecError
from .search import CHOICES as SEARCH_CHOICES
from .search import HNSW_DEFAULTS, resolve

DATASET_NAMES = ("fashion_mnist", "mnist")
FITS = ("pad", "crop", "resize")  # how a photo is fitted to the model's square input
# What a setting left at None means, by kind of run. Fashion-MNIST: the design card's
# recipe. Product catalogs: chosen on clothing-dataset-small's validation/ photos
# (experiments/real_photos.py; results in experiments/results/real_*.md).
RECIPE_DEFAULTS = {"epochs": 32, "learning_rate": 4e-4, "image_fit": None, "flip": False,
                   "pooling": "avg"}
CATALOG_DEFAULTS = {"epochs": 64, "learning_rate": 5e-5, "image_fit": "pad+crop", "flip": True,
                    "pooling": "gem"}
POOLINGS = ("avg", "gem")
ENGINES = ("auto", "keras", "openvino")  # what runs the backbone (fashionrec.engine)
PRECISIONS = ("auto", "float32", "bfloat16")
TRAIN_ON = ("train", "train+validation")  # which products of a split catalog train the head


@dataclass
class RunConfig:
    """Everything that decides what a run computes.

    The defaults are the reference recipe: ResNet50 (ImageNet) at 224 px, the
    first 15,000 training images for the head, the first 5,000 test images as the
    catalog, 32 epochs of batch 64 with a 0.2 validation split (product catalogs differ
    where measured better: :data:`CATALOG_DEFAULTS`).

    Args:
        dataset: ``"fashion_mnist"`` or ``"mnist"``; ``"catalog"`` in a run trained on
            a product catalog (:meth:`Recommender.fit_catalog`, which sets it).
        data_dir: a folder searched first for the dataset's IDX files.
        n_train: training images (from the start of the training split) for the head.
        n_reco: test images (from the start of the test split) that form the catalog.
        image_size: side in pixels the 28x28 images are resized to for the backbone.
        image_fit: how a product photo is fitted to that square: ``"pad"`` (white
            letterbox, the whole product), ``"crop"`` (centre square) or ``"resize"``
            (stretched), or several joined by ``+`` (``"pad+crop"``: the head trains on
            each, an embedding is the mean over them). ``None`` (default): the catalog
            default, ``pad+crop``; Fashion-MNIST's square images are only resized.
        flip: also see every product photo mirrored left-right: the head trains on
            both, and an item's or photo query's embedding (and class probabilities)
            is the mean of the two. ``None`` (default): on for product catalogs
            (measured better on real photos: ``experiments/real_photos.py flip``), off
            for Fashion-MNIST (the design card's recipe). A run records the values used.
        pooling: how the backbone's last feature map becomes a vector: ``"avg"``
            (global average pooling, the recipe) or ``"gem"`` (generalized mean, p=3).
            ``None`` (default): ``avg`` for Fashion-MNIST, ``gem`` for product catalogs
            (measured better on real photos: ``experiments/real_photos.py pooling``).
        train_on: product catalogs with a validation split (split folders): the head
            trains on ``"train"`` (the validation products give its validation curve)
            or, once the settings are chosen, on ``"train+validation"`` (more examples,
            no validation curve). Held-out products never train it.
        epochs, batch_size, learning_rate, dropout, validation_split: head training;
            ``epochs`` and ``learning_rate`` left at ``None`` take the kind of run's
            default (:meth:`resolved`): 32 and 4e-4 for Fashion-MNIST (the recipe), 64
            and 5e-5 for product catalogs (measured better on real photos).
        backbone: ``"resnet50"`` or the path of a saved ``.keras`` model that maps an
            ``(N, H, W, 3)`` batch (``preprocess_input`` applied) to ``(N, D)`` vectors.
        weights: ``"imagenet"``, ``"none"`` (random, seeded) or a Keras weights file.
        extract_batch_size: images per backbone call during feature extraction.
        engine, precision: what runs the frozen backbone: ``"keras"`` or
            ``"openvino"``, in ``"float32"`` or ``"bfloat16"``; ``"auto"`` (default)
            picks OpenVINO bfloat16 where it is installed and the CPU has native
            bfloat16, else Keras float32 (:func:`fashionrec.engine.resolve`). The run's
            backbone record says what was used, and its photo queries use the same.
        seed: seeds weight init, dropout and shuffling.
        metric_loss: a metric-learning loss on the head's ``dense_mid`` beside its
            softmax (``"multi_similarity"`` or ``"supcon"``, :mod:`fashionrec.metric`),
            weighted ``metric_weight``; ``None`` (default): the softmax alone (the recipe).
        qe_k, qe_alpha: alpha query expansion (:mod:`fashionrec.expansion`): each query
            is averaged with its ``qe_k`` nearest catalog items; 0 (default): off.
        fine_tune_blocks, fine_tune_epochs, fine_tune_learning_rate: product catalogs:
            unfreeze the last ``fine_tune_blocks`` residual blocks of the backbone's
            last stage and train them on the training products (:mod:`fashionrec.finetune`)
            before extracting; 0 (default): the backbone stays frozen.
        dba_k, dba_alpha: database-side augmentation: each catalog vector is averaged
            with its ``dba_k`` nearest other items when it is stored; 0 (default): off.
        search: how the catalog is searched: ``"exact"``, ``"hnsw"`` (a FAISS HNSW
            graph, approximate) or ``"auto"`` (HNSW from ``hnsw_min_items`` items up).
        hnsw_m, hnsw_ef_construction: the HNSW graph's links per node and build-time
            search list; ``hnsw_ef_search``: its query-time search list.
    """

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    n_train: int = 15000
    n_reco: int = 5000
    image_size: int = 224
    image_fit: str | None = None
    flip: bool | None = None
    pooling: str | None = None
    epochs: int | None = None
    batch_size: int = 64
    learning_rate: float | None = None
    dropout: float = 0.7
    validation_split: float = 0.2
    train_on: str = "train"
    backbone: str = "resnet50"
    weights: str = "imagenet"
    extract_batch_size: int = 32
    engine: str = "auto"
    precision: str = "auto"
    seed: int = 1234
    metric_loss: str | None = None
    metric_weight: float = 1.0
    qe_k: int = 0
    qe_alpha: float = expansion.DEFAULT_ALPHA
    dba_k: int = 0
    dba_alpha: float = expansion.DEFAULT_ALPHA
    fine_tune_blocks: int = 0
    fine_tune_epochs: int = 3
    fine_tune_learning_rate: float = 1e-4
    search: str = "auto"
    hnsw_min_items: int = 50000
    hnsw_m: int = HNSW_DEFAULTS["m"]
    hnsw_ef_construction: int = HNSW_DEFAULTS["ef_construction"]
    hnsw_ef_search: int = HNSW_DEFAULTS["ef_search"]

    def __post_init__(self):
        self.validate()

    def validate(self, paths=True):
        """Raise :class:`FashionrecError` naming the first bad value; with ``paths``,
        the files and folders named must exist too (what training needs)."""
        if self.dataset not in (*DATASET_NAMES, "catalog"):
            raise FashionrecError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}"
            )
        for name, low in (
            ("n_train", 2),
            ("n_reco", 1),
            ("image_size", 32),
            ("batch_size", 1),
            ("extract_batch_size", 1),
            ("hnsw_min_items", 1),
            ("hnsw_m", 2),
            ("hnsw_ef_construction", 1),
            ("hnsw_ef_search", 1),
            ("fine_tune_blocks", 0),
            ("fine_tune_epochs", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FashionrecError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.image_fit is not None:
            parts = str(self.image_fit).split("+")
            if not all(p in FITS for p in parts) or len(set(parts)) < len(parts):
                raise FashionrecError(f"image_fit must be one or more of {', '.join(FITS)} "
                                      f"joined by '+', got {self.image_fit!r}")
        for name, choices in (("pooling", (None, *POOLINGS)), ("engine", ENGINES),
                              ("precision", PRECISIONS), ("train_on", TRAIN_ON),
                              ("search", SEARCH_CHOICES)):
            if getattr(self, name) not in choices:
                raise FashionrecError(
                    f"{name} must be one of {', '.join(c for c in choices if c)}, "
                    f"got {getattr(self, name)!r}")
        self.metric_loss_setting()
        self.expansion_spec()
        if not (isinstance(self.fine_tune_learning_rate, (int, float))
                and self.fine_tune_learning_rate > 0):
            raise FashionrecError(f"fine_tune_learning_rate must be > 0, got "
                                  f"{self.fine_tune_learning_rate!r}")
        if self.flip not in (None, True, False):
            raise FashionrecError(f"flip must be true, false or None (auto), got {self.flip!r}")
        if not 0.0 <= self.validation_split < 1.0:
            raise FashionrecError(
                f"validation_split must be in [0, 1), got {self.validation_split!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise FashionrecError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(
                self.epochs, int) or self.epochs < 1):
            raise FashionrecError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if self.learning_rate is not None and not (
                isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise FashionrecError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.backbone != "resnet50":
            path = Path(self.backbone)
            if path.suffix != ".keras":
                raise FashionrecError(
                    f"backbone must be 'resnet50' or a saved .keras model, got {self.backbone!r}"
                )
            if paths and not path.is_file():
                raise FashionrecError(f"backbone file {self.backbone} does not exist")
        if not paths:
            return self
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise FashionrecError(
                f"weights must be 'imagenet', 'none' or an existing weights file, "
                f"got {self.weights!r}"
            )
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise FashionrecError(f"data_dir {self.data_dir} is not a folder")
        return self

    def resolved(self, catalog=False):
        """This config with every setting left at ``None`` given the default of its
        kind of run (:data:`CATALOG_DEFAULTS` for a product catalog, else
        :data:`RECIPE_DEFAULTS`)."""
        defaults = CATALOG_DEFAULTS if catalog else RECIPE_DEFAULTS
        d = self.to_dict()
        d.update({k: v for k, v in defaults.items() if d[k] is None})
        return RunConfig.from_dict(d, check_paths=False)

    @property
    def fits(self):
        """The ways a product photo is fitted to the square, in order."""
        return tuple((self.image_fit or CATALOG_DEFAULTS["image_fit"]).split("+"))

    def views(self):
        """``(fit, mirrored)`` of every view a catalog product is seen in."""
        mirrors = (False, True) if self.flip else (False,)
        return [(fit, m) for fit in self.fits for m in mirrors]

    def search_spec(self, n_items, log=None):
        """The search back-end for ``n_items`` (:func:`fashionrec.search.resolve`), with
        the query expansion and database-side augmentation every reader applies (keys
        present only when on)."""
        return {**resolve(self.search, n_items, self.hnsw_min_items, log=log, m=self.hnsw_m,
                          ef_construction=self.hnsw_ef_construction,
                          ef_search=self.hnsw_ef_search),
                **{k: v for k, v in self.expansion_spec().items() if v}}

    def metric_loss_setting(self):
        """The head's metric loss, complete (:func:`fashionrec.metric.resolve`), or
        ``None``."""
        if self.metric_loss is None:
            return None
        return metric.resolve({"name": self.metric_loss, "weight": self.metric_weight})

    def expansion_spec(self):
        """``{"query_expansion": ..., "dba": ...}``, each a setting or ``None``."""
        return {"query_expansion": expansion.resolve({"k": self.qe_k, "alpha": self.qe_alpha}),
                "dba": expansion.resolve({"k": self.dba_k, "alpha": self.dba_alpha},
                                         "database-side augmentation")}

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def of_run(cls, meta):
        """The config a saved run ran with (``run.json``'s record); runs from before a
        setting existed get the value they used."""
        config = dict(meta["config"])
        if meta.get("dataset", {}).get("kind") == "catalog":
            config["image_fit"] = config.get("image_fit") or "pad"
            config["flip"] = bool(config.get("flip"))
        config["pooling"] = meta.get("backbone", {}).get("pooling", "avg")
        return cls.from_dict(config, check_paths=False)

    @classmethod
    def from_dict(cls, d, check_paths=True):
        """A config from a dict (unknown keys ignored). ``check_paths=False`` is for a
        saved run: its training data and backbone files may have moved, or the run
        been copied to another machine, and it can still answer item queries."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        if check_paths:
            return cls(**values)
        cfg = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            setattr(cfg, f.name, values.get(f.name, default))
        return cfg.validate(paths=False)


def project_roots():
    """Folders that play the part of "the project": the working directory and,
    for an editable/source install, the checkout that holds this package."""
    roots = [Path.cwd()]
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and checkout not in roots:
        roots.append(checkout)
    return roots


def shared_dirs():
    """``../shared`` beside the project (the offline mirror), where present.

    ``FASHIONREC_SHARED`` names it explicitly.
    """
    found = []
    env = os.environ.get("FASHIONREC_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [root.parent / "shared" for root in project_roots()]
    for c in candidates:
        c = c.resolve()
        if c.is_dir() and c not in found:
            found.append(c)
    return found
