"""Stage 6 — recommend: the one object users hold.

:class:`Recommender` only composes the stages: :mod:`~fashionrec.training` fits a
model (:class:`~fashionrec.embedder.Embedder`) and its catalog,
:mod:`~fashionrec.publish` saves and loads model versions in a
:class:`~fashionrec.rundir.RunDir`, :mod:`~fashionrec.queries` prepares queries and
searches a catalog snapshot, and the :class:`~fashionrec.store.IndexStore` keeps the
living catalog (``add`` / ``remove`` / ``compact``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import living, queries, training
from .config import RunConfig
from .data import Dataset, get_spec, load_split
from .errors import FashionrecError
from .living import add_products, catalog_features, read_catalog, reindex
from .publish import load_version, publish
from .results import Item, Recommendation  # noqa: F401 - public here too
from .rundir import StaleVersion

DISPLAY_SIZE = 160  # product thumbnails in result grids


def _stderr(message):
    print(message, file=sys.stderr)


class Recommender:
    """Recommend visually similar products: ResNet50 features -> trained head ->
    standardized 512-d embeddings -> Euclidean nearest neighbours.

    Args:
        config: a :class:`RunConfig`; keyword arguments override its fields.

    Example:
        >>> from fashionrec import Recommender
        >>> rec = Recommender(n_train=15000, n_reco=5000).fit(cache_dir="runs/default/features")  # doctest: +SKIP
        >>> rec.save("runs/default")                                         # doctest: +SKIP
        >>> rec = Recommender.load("runs/default")                           # doctest: +SKIP
        >>> [item.id for item in rec.recommend(5033, k=6).items]             # doctest: +SKIP
    """

    lock_wait = 30.0  # seconds a write waits while another process (or a publish) holds the catalog
    retries = 3  # times a write is redone when a retrain publishes a new model meanwhile
    compact_segments, compact_removed_share = living.COMPACT_SEGMENTS, living.COMPACT_REMOVED_SHARE
    auto_compact = True  # add / remove compact past those rules (False: the caller does it)
    refresh_error = None  # why the catalog could not be read back after the last write

    def __init__(self, config=None, **overrides):
        if config is not None and not overrides:
            self._config = config  # validated when it was made
        else:
            self._config = RunConfig.from_dict({**(config or RunConfig()).to_dict(),
                                                **overrides})
        self._state = None  # a publish.Loaded (saved/loaded) or training.Trained

    # ------------------------------------------------------------ training
    def fit(self, dataset=None, cache_dir=None, progress=True, log=print):
        """Fashion-MNIST: extract features, train the head, embed the catalog (see
        :func:`fashionrec.training.train_dataset`)."""
        say = log or (lambda *_: None)
        return self._trained(training.train_dataset(self._config, dataset, cache_dir,
                                                    progress, say))

    def fit_catalog(self, catalog, min_class_size=5, holdout=None, cache_dir=None,
                    progress=True, log=print):
        """Train on your own products and index them all (see
        :func:`fashionrec.training.train_catalog`: split folders hold ``test/`` out;
        else ``holdout`` is a seeded, stratified share held out of training)."""
        say = log or (lambda *_: None)
        return self._trained(training.train_catalog(self._config, catalog, min_class_size,
                                                    holdout, cache_dir, progress, say))

    def extract_catalog(self, catalog, min_class_size=5, cache_dir=None, progress=True,
                        log=print, runner=None):
        """Only the feature extraction of :meth:`fit_catalog`, into ``cache_dir``
        (``runner``: e.g. :class:`fashionrec.distributed.RayExtractor`). Returns
        ``{"n_items", "n_failed", "failed", "files"}``."""
        return training.extract_only(self._config, catalog, min_class_size, cache_dir,
                                     progress, log or (lambda *_: None), runner)

    def _trained(self, trained):
        self._state = trained
        return self

    # ------------------------------------------------------------ save / load
    def save(self, run_dir, force=False, log=print):
        """Publish the trained model as the run's new version (atomically); products
        of the catalog it replaces are carried over (:func:`fashionrec.publish.publish`).
        ``force``: train into a non-empty folder that holds no run."""
        self._held()
        trained = self._state
        self._state = publish(trained, run_dir, force, log)
        # keep the backbone already built, the catalog check's report, the dataset
        state = self._state
        state.embedder, state.report, state.dataset = (trained.embedder, trained.report,
                                                       trained.dataset)
        return Path(run_dir)

    @classmethod
    def load(cls, run_dir, log=_stderr):
        """The published version of a run saved by :meth:`save` (any process)."""
        loaded = load_version(run_dir, log)
        rec = cls(loaded.config)
        rec._state = loaded
        return rec

    def _held(self):
        if self._state is None:
            raise FashionrecError("this Recommender is not trained; call fit() or load()")
        return self._state

    def _loaded(self):
        if not hasattr(self._held(), "run"):  # trained, not saved
            raise FashionrecError("save() the run first: updates go to its saved index")
        return self._state

    # ------------------------------------------------------------ what it holds
    @property
    def config(self):
        return self._config if self._state is None else self._state.config

    @property
    def metadata_(self):
        """The run's record (``run.json``)."""
        return self._held().metadata

    @property
    def run_id_(self):
        return self.metadata_["run_id"]

    @property
    def index_(self):
        """The catalog snapshot queries search (replaced whole by every write)."""
        return self._held().index

    @property
    def embedder_(self):
        return self._held().embedder

    @property
    def head_(self):
        return self.embedder_.head

    @property
    def extractor(self):
        return self.embedder_.extractor

    @property
    def report_(self):
        """The catalog check's report (after ``fit_catalog``), else ``None``."""
        return getattr(self._state, "report", None)

    @property
    def split_(self):
        return getattr(self._state, "split", None)

    @property
    def class_names(self):
        return self.index_.class_names

    @property
    def is_catalog(self):
        """Whether the run was trained on a product catalog (not Fashion-MNIST)."""
        return self.metadata_.get("dataset", {}).get("kind") == "catalog"

    @property
    def search_spec(self):
        """How the catalog is searched (``run.json``'s ``search``)."""
        return self.metadata_.get("search") or {"backend": "exact"}

    @property
    def image_shape(self):
        """A Fashion-MNIST run's image shape (its queries are resized to it)."""
        return tuple(self.metadata_["dataset"].get("image_shape", (28, 28)))[:2]

    def head_outputs(self, views):
        """:meth:`fashionrec.embedder.Embedder.encode_features` of this run's model."""
        return self.embedder_.encode_features(views)

    def test_images(self):
        """Images and labels of the test split the run was trained with."""
        if self.is_catalog:
            raise FashionrecError("this run indexes a product catalog, which has no test "
                                  "split; query by item id or by image")
        if getattr(self, "_dataset", None) is None:  # fit() keeps the one it trained on
            self._dataset = (getattr(self._state, "dataset", None)
                             or _test_split(self.config, self.index_))
        return self._dataset.x_test, self._dataset.y_test

    def query_image(self, query):
        """The image a query stands for (as the model sees it) and a dict describing it."""
        views, info = queries.prepare(query, self.embedder_, self.image_shape, self.test_images)
        return views[0], info

    def item_image(self, item_id, index=None):
        """A catalog item's picture for display, or ``None`` if its file is gone."""
        return queries.item_picture(self.index_ if index is None else index, item_id,
                                    DISPLAY_SIZE)

    def item(self, item_id):
        """The catalog item ``item_id`` (an :class:`~fashionrec.results.Item`, rank 0)."""
        index = self.index_
        row = queries.item_query(index, index.class_names, item_id)[1]
        return queries.item_at(index, index.class_names, 0, row, 0.0)

    def browse(self, offset=0, limit=24, class_name=None, category=None, where=None):
        """``(total, items)``: the catalog's items (of a class, in a category, matching
        ``where``) from ``offset``, at most ``limit`` of them, in catalog order."""
        return queries.browse(self.index_, offset, limit, class_name, category, where)

    def stats(self):
        """What is served: items, classes, the run, its catalog and search (no paths)."""
        return self._loaded().stats()

    def catalog_features(self, cache_dir=None, progress=True):
        """Backbone features of every catalog item, in row order, one array per view
        (from the feature cache when the catalog is the one the run was trained on)."""
        return catalog_features(self, cache_dir, progress)

    # ------------------------------------------------------------ recommend
    def recommend(self, query=None, k=6, *, item=None, same_class=False, category=None,
                  where=None, with_image=True):
        """The ``k`` catalog items nearest to a query: a test index (Fashion-MNIST), an
        image path, image bytes or an image array; or ``item``, a catalog item's id.
        ``same_class``, ``category``, ``where`` (:mod:`fashionrec.filters`) filter; a
        catalog query never gets itself back; one catalog snapshot answers it all."""
        self._held()
        queries.check_k(k)
        if (query is None) == (item is None):
            raise FashionrecError("give either a query (test index, image) or an item id")
        if item is None:
            result = self.recommend_batch([dict(query=query, k=k, same_class=same_class,
                                                category=category, where=where)])[0]
            if isinstance(result, FashionrecError):
                raise result
            return result
        index = self.index_  # one snapshot for the whole query
        info, row = queries.item_query(index, index.class_names, item)
        return queries.nearest(index, index.class_names, info, queries.item_vector(index, row),
                               info["true_label"], row,
                               self.item_image(item, index) if with_image else None, k,
                               same_class, category, where)

    def recommend_batch(self, requests):
        """Recommendations for several image queries with one backbone call; a bad
        request gets its :class:`FashionrecError` in its place, not the batch's."""
        state = self._held()  # one model and catalog for the whole batch
        return queries.answer(state.embedder, state.index, requests, self.image_shape,
                              self.test_images)

    # ------------------------------------------------------------ a living catalog
    def read_catalog(self, path, **options):
        """Read a folder or CSV of products with the options this run was trained with."""
        return read_catalog(self.metadata_, path, **options)

    def add(self, catalog, progress=True, log=print):
        """Add new products (a :class:`~fashionrec.catalog.Catalog`) to the saved
        catalog without retraining; see :func:`fashionrec.living.add_products`."""
        out = self._write(lambda state: add_products(state, catalog, self.lock_wait,
                                                     progress, log))
        living.compact_when_due(self, progress, log)
        return out

    def remove(self, ids, log=print):
        """Remove discontinued products (by id) from the saved catalog; all or nothing."""
        ids = list(ids)  # any iterable, read once

        def remove(state):
            state.store(self.lock_wait).remove(ids)
            if log:
                log(f"remove: {len(ids)} product(s) removed")
        self._write(remove)
        if log:
            log(f"remove: the catalog now holds {len(self.index_)} items")
        living.compact_when_due(self, False, log)
        return self

    def compaction_due(self):
        """Why the catalog should be compacted now (:func:`~fashionrec.living.compaction_due`)."""
        return living.compaction_due(self._loaded(), self.compact_segments,
                                     self.compact_removed_share)

    def compact(self, progress=True, log=print):
        """Fold added and removed products into a new base (and HNSW graph)."""
        return self._write(lambda state: state.store(self.lock_wait).compact(
            self.search_spec, progress=progress, log=log))

    def reindex(self, search_choice, progress=True, log=print, store=None, **hnsw_params):
        """Search this saved run another way (``"exact"``, ``"hnsw"``, ``"auto"``): build
        (or drop) its HNSW graph; or move its catalog to ``store`` (``{"kind": "milvus",
        "uri", "collection"}`` or ``{"kind": "file"}``); recorded in ``run.json``."""
        return self._write(lambda state: reindex(state, search_choice, self.lock_wait,
                                                 progress, log, hnsw_params, store))

    def _write(self, write):
        """``write(state)`` on the published version, then the catalog reloaded; redone
        on the new version when a retrain published one meanwhile."""
        state = self._loaded()
        for attempt in range(self.retries + 1):
            try:
                out = write(state)
                break
            except StaleVersion:
                if attempt == self.retries:
                    raise
                state = self._state = load_version(state.run.path, log=None)
        try:
            self.refresh()
            self.refresh_error = None
        except (FashionrecError, OSError) as exc:  # the write is saved all the same: say
            self.refresh_error = str(exc)  # so, and let the next refresh read it
        return out

    def refresh(self, log=None):
        """Read the catalog (and record) of the published version again, e.g. after
        another process wrote to it; a retrained run is loaded whole."""
        state = self._loaded()
        try:
            self._state = state.refreshed(log)
        except StaleVersion:
            self._state = load_version(state.run.path, log)
        return self


def _test_split(cfg, index):
    x, y, folder = load_split(cfg.dataset, "test", cfg.data_dir)
    ids, images = index.ids, index.images
    base = (ids >= 0) & (ids < cfg.n_reco)  # items of the trained catalog
    if images is not None and not (
            len(x) >= cfg.n_reco and np.array_equal(x[ids[base]], images[base])):
        raise FashionrecError(f"the {cfg.dataset} test split in {folder} is not the one this "
                              f"run's catalog was made from; query by image instead")
    return Dataset(cfg.dataset, None, None, x, y, get_spec(cfg.dataset).class_names)

