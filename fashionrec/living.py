"""A living catalog: products added to and removed from a published model version,
and how it is searched, without retraining.

Each function takes the published version (:class:`fashionrec.publish.Loaded`) and
writes through its store, whose lock refuses a write meant for a version a retrain
has replaced (the :class:`~fashionrec.recommend.Recommender` then redoes it on the
new version).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from . import attributes as attrs
from . import expansion, images
from .catalog import Catalog
from .config import RunConfig
from .data import get_spec
from .errors import FashionrecError
from .ids import check_id
from .index import CatalogIndex

COMPACT_SEGMENTS = 64  # unfolded segments from which a write compacts the catalog
COMPACT_REMOVED_SHARE = 0.2  # ... or the share of removed items (of live + removed)

LAYOUT_OPTIONS = ("label_depth", "label_column", "id_column", "image_column",
                  "image_pattern", "category_columns")


def read_catalog(meta, path, **options):
    """Read a folder or CSV of products with the layout options the run (record
    ``meta``) was trained with, each overridable."""
    source = meta.get("dataset", {}).get("source")
    saved = {k: v for k, v in (source if isinstance(source, dict) else {}).items()
             if k in LAYOUT_OPTIONS}
    if Path(path).is_dir():
        saved = {k: v for k, v in saved.items() if k == "label_depth"}
    return Catalog.read(path, **{**saved, **{k: v for k, v in options.items()
                                             if v is not None}})


def add_products(state, catalog, lock_wait=0.0, progress=True, log=print):
    """Embed new products with the version's model and append them to its catalog as
    one segment (nothing else is rewritten).

    An item without a class gets the head's prediction; an item of a class the head
    does not know, or whose id is already in the catalog, is skipped and reported. A
    catalog listing no product, or an invalid id (:func:`fashionrec.ids.check_id`),
    stops us before any work.

    Returns:
        ``{"n_added", "added": [{"id", "class", "class_from"}], "skipped": [...]}``.
    """
    say = log or (lambda *_: None)
    index, names = state.index, state.index.class_names
    kind = state.metadata.get("dataset", {}).get("kind")
    if not len(catalog):
        where = catalog.source.get("root") or catalog.source.get("manifest") or "given"
        detail = ", ".join(f"{n} {k}" for k, n in Counter(
            s["kind"] for s in catalog.skipped).items())
        raise FashionrecError(f"the catalog {where} lists no product to add "
                              f"({len(catalog.skipped)} skipped{': ' * bool(detail)}{detail})")
    for item_id in catalog.ids:  # bad ids and ids of the wrong kind stop us before any work
        _check_new_id(state.metadata, index.parse_id(check_id(item_id)))
    given = _attributes(catalog, index.schema, say)  # ... and so do unfit attribute values
    # a catalog run decodes each new image once, in the extractor
    clean, report = catalog.check(min_class_size=1, progress=progress,
                                  decode=kind != "catalog")
    clean, labels, skipped = _usable(clean, index, names, list(report["skipped"]))
    result = {"n_added": 0, "added": [], "skipped": skipped}
    stored = None
    if kind == "catalog" and len(clean):
        feats, failed = state.embedder.catalog_features(clean, progress=progress)
        if failed:
            good = [i for i in range(len(clean)) if i not in failed]
            clean, dropped = clean.drop_failed(failed, {"skipped": []})
            skipped += dropped["skipped"]
            labels, feats = [labels[i] for i in good], [f[good] for f in feats]
    if not len(clean):
        say("add: no usable new products")
        return result
    if kind == "catalog":
        probs, vectors = state.embedder.encode_features(feats)
    else:  # a Fashion-MNIST catalog stores its 28x28 gray images
        shape = tuple(state.metadata["dataset"].get("image_shape", (28, 28)))[:2]
        stored = np.stack([images.load_image(p, shape) for p in clean.paths])
        probs, vectors = state.embedder.encode_images(stored, progress)
        stored = np.clip(stored, 0, 255).astype(np.uint8)
    dba = state.metadata.get("search", {}).get("dba")
    if dba and getattr(index, "remote", False):
        raise FashionrecError("database-side augmentation needs the catalog's vectors at "
                              "hand: it is not supported with the Milvus store")
    if dba and len(index):  # joins the catalog as its products did (expansion module)
        vectors = expansion.expand(vectors, index.vectors, index.backend, dba)
    ids = [index.parse_id(i) for i in clean.ids]
    labels = [int(p) if lab is None else lab for lab, p in zip(labels, probs.argmax(1),
                                                               strict=True)]
    state.store(lock_wait).add(CatalogIndex(
        vectors, ids, labels, names, None, stored, paths=[str(p) for p in clean.paths],
        categories=clean.categories, schema=index.schema, attributes=attrs.columns(
            index.schema, {k: v for k, v in (clean.attributes or {}).items() if k in given},
            len(clean))))
    result.update(n_added=len(ids), added=[
        {"id": i, "class": names[lab], "class_from": "catalog" if given is not None
         else "predicted"} for i, lab, given in zip(ids, labels, clean.labels, strict=True)])
    say(f"add: {len(ids)} product(s) added, {len(skipped)} skipped")
    return result


def _attributes(catalog, schema, say):
    """The attributes ``catalog``'s products give that the run's ``schema`` has, each
    value checked (a value that does not fit stops the add, naming the product); a
    column the schema lacks is left out (said), one given by hand is an error."""
    raw = catalog.attributes or {}
    if catalog.source.get("layout") == "files":  # --attr / the API: every name must exist
        attrs.given(schema, {k: None for k in raw})
    extra = [k for k in raw if k not in schema]
    if extra:
        say(f"add: column(s) {', '.join(extra)} are not attributes of this run's catalog "
            f"(it has: {', '.join(schema) or 'none'}); left out")
    kept = {k: v for k, v in raw.items() if k in schema}
    attrs.columns(schema, kept, len(catalog), catalog.ids)
    return set(kept)


def _usable(clean, index, names, skipped):
    """The items that can be added, their class numbers (``None``: predict), and the
    skipped list grown by those that cannot."""
    keep, labels = [], []
    for i, (item_id, label) in enumerate(zip(clean.ids, clean.labels, strict=True)):
        reason = None
        # the catalog as loaded; the store checks again under its lock when writing
        if index.row_of(item_id) is not None:
            kind, reason = "already in the index", "remove it first to replace it"
        elif label is not None and label not in names:
            kind = "unknown class"
            reason = f"class {label!r} is not one this run was trained on; retrain to add it"
        if reason:
            skipped.append({"id": item_id, "path": str(clean.paths[i]), "kind": kind,
                            "reason": reason})
            continue
        keep.append(i)
        labels.append(None if label is None else names.index(label))
    return clean.subset(keep), labels, skipped


def _check_new_id(meta, item_id):
    """On a dataset run an item id below the test split's size is that test image:
    a new product may not take one, so ids and test indices never mix."""
    dataset = meta.get("dataset", {})
    if dataset.get("kind") == "catalog" or not isinstance(item_id, int):
        return
    n_test = dataset.get("n_test") or get_spec(meta["config"]["dataset"]).n_test
    if 0 <= item_id < n_test:
        raise FashionrecError(
            f"id {item_id} is test image {item_id} of {meta['config']['dataset']}; new "
            f"products take ids from {n_test} up (ids below are the test images themselves)")


def compaction_due(state, segments=COMPACT_SEGMENTS, removed_share=COMPACT_REMOVED_SHARE):
    """Why the version's catalog should be compacted now, or ``None``: ``segments`` or
    more added segments not folded into the base (each is a file a load reads), or
    removed items making up ``removed_share`` or more of the catalog (they are still
    searched, then dropped). ``0`` turns a rule off."""
    store = state.store()
    if not hasattr(store, "pending"):  # Milvus compacts its own segments
        return None
    pending = store.pending()
    if segments and pending["segments"] >= segments:
        return f"{pending['segments']} added segments (the limit is {segments})"
    removed = pending["removed"]
    share = removed / max(len(state.index) + removed, 1)
    if removed_share and removed and share >= removed_share:
        return f"{removed} removed items, {share:.0%} of the catalog (the limit is " \
               f"{removed_share:.0%})"
    return None


def compact_when_due(rec, progress=False, log=None):
    """After a write through ``rec`` (a :class:`~fashionrec.recommend.Recommender` with
    ``auto_compact``): compact its catalog if :meth:`~fashionrec.recommend.Recommender.compaction_due`
    says so. A compaction that cannot run now (another process holds the catalog) is
    left to a later write; the write before it is saved either way."""
    say = log or (lambda *_: None)
    if rec.auto_compact and (why := rec.compaction_due()):
        say(f"compact: {why}; folding them into the base")
        try:
            rec.compact(progress, log)
        except FashionrecError as exc:
            say(f"compact: not now ({exc}); a later write tries again")


def reindex(state, search_choice, lock_wait, progress, log, hnsw_params, store=None):
    """Build (or drop) the version's HNSW graph for a new search choice and record the
    choice in its record; returns the search spec. With ``store``, move the catalog
    instead (:func:`move_store`) and return the store's record."""
    if store is not None:
        return move_store(state, **store, progress=progress, log=log)
    config = RunConfig.from_dict({**state.metadata["config"], "search": search_choice,
                                  **{k: v for k, v in hnsw_params.items() if v is not None}},
                                 check_paths=False)
    spec = config.search_spec(len(state.index), log=log)
    state.store(lock_wait).build_graph(spec, progress=progress, log=log)
    state.run.rewrite(state.version, {**state.metadata, "config": config.to_dict(),
                                      "search": spec})
    return spec


def move_store(state, kind, uri=None, collection=None, progress=True, log=print):
    """Copy the version's catalog into Milvus (``kind="milvus"``: a new collection
    behind the alias ``collection``, then ``run.json`` names it) or back into the
    version's own files (``kind="file"``); returns the store record."""
    from .milvus import MilvusStore
    from .store import IndexStore

    say = log or (lambda *_: None)
    meta, index = state.metadata, state.index
    where = meta.get("store") or {"kind": "file"}
    if kind == where.get("kind", "file") and (kind == "file" or (
            uri == where.get("uri") and collection == where.get("collection"))):
        say(f"index: the catalog is already in that store ({kind})")
        return where
    search = meta.get("search") or {"backend": "exact"}
    if kind == "milvus":
        if not uri or not collection:
            raise FashionrecError("--store milvus needs --milvus-uri and --collection")
        if search.get("query_expansion") or search.get("dba"):
            raise FashionrecError("query expansion and database-side augmentation need the "
                                  "catalog's vectors at hand: turn them off (--qe-k 0) "
                                  "before moving the catalog into Milvus")
        if getattr(index, "remote", False):
            index = index.export(progress)
        store = MilvusStore(uri, collection, index.class_names, index.schema, index.id_kind)
        say(f"index: copying {len(index)} products into Milvus collection {collection!r}")
        store.publish(index, progress)
        record = {**store.describe(), "id_kind": index.id_kind}
    else:
        if kind != "file":
            raise FashionrecError(f"--store is file or milvus, not {kind!r}")
        exported = index.export(progress)
        exported.metadata = {"run_id": meta["run_id"]}
        store = IndexStore.of(state.version, guard=state.check_current)
        say(f"index: copying {len(exported)} products back into {store.path}")
        store.write_base(exported)
        if search["backend"] != "exact":
            store.build_graph(search, progress=progress, log=log)
        record = None
    new_meta = {k: v for k, v in meta.items() if k != "store"}
    if record is not None:
        new_meta["store"] = record
    state.run.rewrite(state.version, new_meta)
    return record or {"kind": "file"}


def catalog_features(rec, cache_dir=None, progress=True):
    """Backbone features of every catalog item of ``rec``, in row order, one array per
    view, from the feature cache when the catalog is the one the run was trained on."""
    index, meta = rec.index_, rec.metadata_
    if not rec.is_catalog or index.paths is None:
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
    data = meta["dataset"]
    trained = digest == data.get("features_sha256", data.get("content_sha256"))
    views, failed = rec.embedder_.catalog_features(
        cat, digest, cache_dir, progress, "catalog" if trained else "catalog-now")
    if failed:
        row, reason = next(iter(failed.items()))
        raise FashionrecError(f"item {index.ids[row]!r}: {reason}")
    return views
