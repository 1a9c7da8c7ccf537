"""Model versions on disk: loading the published one, and publishing a new one.

:func:`load_version` opens what ``run.json`` names. :func:`publish` writes a trained
model as a new version and makes it the published one in one atomic step, carrying
over every product of the living catalog it replaces:

1. the previous version's live catalog is read (a snapshot at generation *g*);
2. products that the new training did not index itself (added since the last
   train) are re-embedded by the new model from their stored images, and products
   removed from the previous version stay removed;
3. the new version's files are written in full (a kill here leaves the previous
   version published; the next publish deletes the leftover folder);
4. under the previous version's store lock (writers wait), the writes that arrived
   after *g* are re-applied to the new catalog, and ``run.json`` is replaced;
5. a writer still holding the previous model then finds it retired
   (:class:`~fashionrec.rundir.StaleVersion`) and redoes its write on the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import expansion, search
from .artifacts import read_json, write_json
from .catalog import Catalog, CatalogSplit
from .config import RunConfig
from .embedder import PLAIN, Embedder
from .errors import FashionrecError
from .extract import BackboneInfo
from .index import CatalogIndex
from .rundir import RunDir, StaleVersion
from .store import IndexStore


@dataclass
class Loaded:
    """One published model version as a process holds it (a snapshot: replaced whole,
    never changed in place)."""

    run: RunDir
    version: object  # rundir.Version
    metadata: dict
    embedder: Embedder
    index: CatalogIndex
    split: CatalogSplit | None = None
    report: dict | None = None  # the catalog check's, when this process trained it
    dataset: object = None  # the Dataset, when this process trained on one

    @property
    def config(self):
        """The settings, derived from the record (their one copy)."""
        return RunConfig.of_run(self.metadata)

    def store(self, lock_wait=0.0):
        """The version's catalog store; its writes are refused once another version
        is published."""
        return store_of(self.version, self.metadata, lock_wait, guard=self.check_current)

    def refreshed(self, log=None):
        """This version with its record and catalog read again (after writes, by this
        or another process); :class:`StaleVersion` if another version is published."""
        meta = self.run.read()
        if self.run.version_of(meta).folder.resolve() != self.version.folder.resolve():
            raise StaleVersion(f"{self.run.path} now publishes another version")
        store = store_of(self.version, meta)
        if not isinstance(store, IndexStore):
            return replace(self, metadata=meta, index=store.snapshot())
        index = store.load(meta.get("search") or {"backend": "exact"}, log=log,
                           reuse=self.index)
        return replace(self, metadata=meta, index=index)

    def stats(self):
        """What is served: items, classes, the run, its catalog and search (no paths)."""
        meta, index = self.metadata, self.index
        search = meta.get("search") or {"backend": "exact"}
        return {"items": len(index), "classes": list(index.class_names),
                "attributes": dict(index.schema),
                "run": {"run_id": meta["run_id"], "dataset": meta["dataset"].get("name"),
                        "kind": meta["dataset"].get("kind"),
                        "backbone": self.embedder.info.describe(public=True),
                        "image_size": self.embedder.image_size,
                        "created": meta.get("created"),
                        "fashionrec_version": meta.get("fashionrec_version")},
                "index": {"generation": index.metadata.get("generation", 0),
                          "updates": index.metadata.get("n_updates", 0),
                          "search": search["backend"], "search_params": search}}

    def check_current(self):
        if self.run.current().folder.resolve() != self.version.folder.resolve():
            raise StaleVersion(f"{self.run.path} was retrained meanwhile: this write was "
                               f"made for the model it replaced; send it again")


def load_version(run_dir, log=None, attempts=3):
    """The published version of ``run_dir``, loaded (retried if a publish replaced it
    while it was being read)."""
    run = RunDir(run_dir)
    for attempt in range(attempts):
        stamp = run.stamp()
        try:
            return _load(run, run.read(), log)
        except FashionrecError:
            if attempt == attempts - 1 or run.stamp() == stamp:
                raise


def _load(run, meta, log):
    version = run.current(meta)
    try:
        cfg = RunConfig.of_run(meta)
        info = BackboneInfo.from_dict(meta["backbone"])
    except (KeyError, TypeError) as exc:
        raise FashionrecError(f"{run.run_file} is not a fashionrec run ({exc})") from None
    search = meta.get("search") or {"backend": "exact"}
    store = store_of(version, meta)
    index = store.snapshot(search, log=log)
    run_id = meta["run_id"]
    if isinstance(store, IndexStore) and index.metadata.get("run_id") != run_id:
        raise FashionrecError(f"{version.folder} mixes files of two runs (an interrupted "
                              f"save?); re-run `make train`")
    views = cfg.views() if cfg.dataset == "catalog" else PLAIN
    embedder = Embedder.load(version, info, views, cfg.extract_batch_size, run_id,
                             legacy_scaler=lambda: _legacy_scaler(index, version))
    split = None
    if version.split.is_file():
        state = read_json(version.split, "split file")
        if state.get("run_id") != run_id:
            raise FashionrecError(f"{version.split} belongs to another run; re-run "
                                  f"`make train`")
        split = CatalogSplit.from_dict(state)
    return Loaded(run, version, meta, embedder, index, split)


def store_of(version, meta, lock_wait=0.0, guard=None):
    """The catalog store a version's record names: its files (:class:`IndexStore`), or
    a Milvus collection (``run.json``'s ``store``, :class:`fashionrec.milvus.MilvusStore`)."""
    where = meta.get("store") or {"kind": "file"}
    if where.get("kind", "file") == "file":
        return IndexStore.of(version, lock_wait, guard=guard)
    if where["kind"] != "milvus":
        raise FashionrecError(f"run.json names an unknown catalog store {where['kind']!r}")
    from .milvus import MilvusStore

    data = meta.get("dataset", {})
    return MilvusStore(where["uri"], where["collection"], data.get("class_names", ()),
                       meta.get("attributes"), where.get("id_kind", "str"), guard,
                       where.get("search", {}).get("ef", 128), target=where.get("current"))


def _legacy_scaler(index, version):
    if index.scaler is None:
        raise FashionrecError(f"{version.embedder} does not exist")
    return index.scaler


# ---------------------------------------------------------------- publishing
@dataclass
class _Previous:
    """The published version a retrain replaces: its record and catalog (its model is
    not needed)."""

    version: object
    metadata: dict
    store: object  # IndexStore, or a MilvusStore
    index: CatalogIndex
    added: list  # ids added since its model was trained, still live
    removed: list  # ids removed since its catalog was first trained


def publish(trained, run_dir, force=False, log=print):
    """Write ``trained`` (:class:`~fashionrec.training.Trained`) as the new published
    version of ``run_dir``, carrying the living catalog over (see the module doc);
    returns its :class:`Loaded`. ``force``: publish into a folder that holds no run,
    or over a published version whose catalog cannot be read (its products are lost)."""
    say = log or (lambda *_: None)
    run = RunDir(run_dir)
    run.check_target(force)
    with run.locked():
        prev = _previous(run, force, say)
        meta = trained.metadata
        if prev is not None and prev.metadata["run_id"] == meta["run_id"]:
            return load_version(run.path, log=None)  # this very version is published
        version = run.new_version(meta["run_id"])
        carry = prev is not None and _compatible(prev, trained, say)
        index = _carry(trained, prev, say) if carry else trained.index
        if prev is not None and not isinstance(prev.store, IndexStore):
            _publish_milvus(trained, run, version, prev, index, carry, say)
            return load_version(run.path, log=None)
        store = IndexStore.of(version)
        _write(trained, version, store, index)
        if not carry:
            run.publish(version, meta)
        else:
            with prev.store.locked():  # writers to the previous version wait, then redo
                _catch_up(trained, store, prev.index, prev.store.load(), say)
                run.publish(version, meta)
    return load_version(run.path, log=None)


def _previous(run, force, say):
    if not run.exists():
        return None
    try:
        meta = run.read()
    except FashionrecError:
        meta = {}
    if (meta.get("store") or {}).get("kind", "file") != "file":  # never --force-d away
        version = run.current(meta)
        store = store_of(version, meta)
        return _Previous(version, meta, store, *store.read_with_history())
    try:
        meta = run.read()
        version = run.current(meta)
        store = IndexStore.of(version, lock_wait=600.0)
        index, added, removed = store.read_with_history()  # one generation: none between
        return _Previous(version, meta, store, index, added, removed)
    except FashionrecError as exc:
        if not force:
            raise FashionrecError(
                f"the published version in {run.path} cannot be read ({exc}), so its "
                f"products cannot be carried over; repair it, or train with --force to "
                f"publish without them") from None
        say(f"publish: WARNING: the published version cannot be read ({exc}); with "
            f"--force its products are not carried over")
        return None


def _write(trained, version, store, index):
    run_id = trained.metadata["run_id"]
    trained.embedder.save(version, run_id)
    if store is not None:
        store.write_base(index)
    if trained.report is not None:
        write_json(version.report, trained.report)
    if trained.split is not None:
        write_json(version.split, {"run_id": run_id, **trained.split.to_dict()})


def _publish_milvus(trained, run, version, prev, index, carry, say):
    """Publish into the Milvus catalog of ``prev``: a new collection is built with the
    carried-over catalog; then, while writes by others wait (``publishing``), the writes
    made during the retrain are applied to it, the alias is switched to it and
    ``run.json`` names the model and the collection together."""
    meta = trained.metadata
    if meta["search"].get("dba") or meta["search"].get("query_expansion"):
        raise FashionrecError("query expansion and database-side augmentation need the "
                              "catalog's vectors at hand: they are not supported with the "
                              "Milvus store (train without --dba-k / --qe-k)")
    _write(trained, version, None, index)
    store = type(prev.store)(prev.store.uri, prev.store.collection, index.class_names,
                             index.schema, index.id_kind, client=prev.store.client)
    name = store.build(index)
    built = store.pinned(name, publisher=True)
    say(f"publish: {len(index)} products in Milvus collection {name!r}")
    with prev.store.publishing():
        if carry:
            _catch_up(trained, built, prev.index, prev.store.load(), say)
        store.switch(name)
        record = {**prev.metadata["store"], **built.describe(), "id_kind": index.id_kind}
        run.publish(version, {**meta, "store": record})


def _compatible(prev, trained, say):
    old, new = prev.metadata.get("dataset", {}), trained.metadata["dataset"]
    same = old.get("kind") == new["kind"] and (
        new["kind"] == "catalog" or old.get("name") == new["name"])
    if same and (not len(prev.index) or prev.index.id_kind == trained.index.id_kind):
        return True
    say(f"publish: the previous version is a catalog of another kind ({old.get('name')}); "
        f"its {len(prev.added)} added product(s) are not carried over")
    return False


def _carry(trained, prev, say):
    """The new catalog: the new training's products without those removed from the
    previous version, plus the products added to it since its training, re-embedded
    by the new model (an id the new training has itself keeps the trained one)."""
    index, removed = trained.index, set(prev.removed)
    keep = np.array([i not in removed for i in index.ids.tolist()], dtype=bool)
    extra = [prev.index.row_of(i) for i in prev.added if index.row_of(i) is None]
    parts, rows, carried = [index], [np.flatnonzero(keep)], []
    part = reembed(trained.embedder, index.class_names,
                   prev.index.take(np.array(extra, dtype=np.int64)), say, index,
                   trained.metadata["search"].get("dba"))
    if part is not None:
        parts.append(part)
        rows.append(None)
        carried = part.ids.tolist()
    if len(parts) > 1 or not keep.all():
        say(f"publish: {len(carried)} product(s) added since the last train re-embedded by "
            f"the new model, {int((~keep).sum())} removed one(s) left out")
        index = CatalogIndex.concat(parts, rows)
        spec = trained.metadata["search"]
        if spec["backend"] != "exact":  # the graph is built over the whole new catalog
            index.backend = search.build(spec, index.vectors)
    index.metadata = {**trained.index.metadata, "added_ids": carried,
                      "removed_ids": sorted(removed, key=str)}
    return index


def _catch_up(trained, store, seen, now, say):
    """Apply to the new version's store what was written to the previous one after
    ``seen`` was read (under the previous store's lock, so nothing more arrives): adds,
    replacements (an id removed and added again) and removals. A write answered
    during the retrain is newer than the training's own copy of the product."""
    fresh = _changed(seen, now)
    gone = [i for i in seen.ids.tolist() if now.row_of(i) is None]
    current = store.load() if isinstance(store, IndexStore) else store.snapshot()
    stale = [i for i in [*now.ids[fresh].tolist(), *gone] if current.row_of(i) is not None]
    if stale:
        store.remove(stale)
    part = reembed(trained.embedder, trained.index.class_names, now.take(fresh), say,
                   current, trained.metadata["search"].get("dba"))
    if part is not None:
        store.add(part)
    if len(fresh) or gone:
        say(f"publish: {len(fresh)} add(s) and {len(gone)} removal(s) made during the "
            f"retrain applied to the new version")


def _changed(seen, now, chunk=65536):
    """Rows of ``now`` that ``seen`` does not have, or has with another vector (an id
    removed and added again), compared a chunk at a time."""
    where = np.array([-1 if (r := seen.row_of(i)) is None else r for i in now.ids.tolist()],
                     dtype=np.int64)
    changed = where < 0
    for start in range(0, len(now), chunk):
        rows = np.arange(start, min(start + chunk, len(now)))
        rows = rows[where[rows] >= 0]
        if len(rows):
            same = (np.asarray(seen.vectors[where[rows]]) == np.asarray(now.vectors[rows])).all(1)
            changed[rows[~same]] = True
    return np.flatnonzero(changed)


def reembed(embedder, class_names, rows, say=None, joining=None, dba=None):
    """``rows`` (a :class:`CatalogIndex` of another model's products) embedded by
    ``embedder`` from their stored images; a class the new model does not know is
    replaced by its prediction. A product whose image is gone cannot be embedded: it
    is left out, and said so. ``None`` when no product is left. With ``dba`` (the run's
    database-side augmentation), the vectors are augmented against ``joining``, the
    new model's catalog they join."""
    if not len(rows):
        return None
    if rows.images is None:
        ok = [r for r, p in enumerate(rows.paths) if p and Path(p).is_file()]
        views, failed = [], {}
        if ok:
            cat = Catalog.from_files([rows.paths[r] for r in ok], ids=rows.ids[ok].tolist())
            cat.sha256 = [""] * len(cat)
            views, failed = embedder.catalog_features(cat, progress=False)
        good = [ok[r] for r in range(len(ok)) if r not in failed]
        lost = sorted(set(range(len(rows))) - set(good))
        if lost and say:
            say(f"publish: WARNING: {len(lost)} product(s) could not be carried over, their "
                f"image is gone or unreadable: {', '.join(map(str, rows.ids[lost][:5]))}")
        views = [v[[r for r in range(len(ok)) if r not in failed]] for v in views]
        rows = rows.take(np.array(good, dtype=np.int64))
        if not len(rows):
            return None
        probs, vectors = embedder.encode_features(views)
    else:
        probs, vectors = embedder.encode_images(rows.images.astype(np.float32))
    if dba and joining is not None and len(joining):
        vectors = expansion.expand(vectors, joining.vectors, joining.backend, dba)
    old_names = [rows.class_names[label] for label in rows.labels]
    labels = [class_names.index(n) if n in class_names else int(p.argmax())
              for n, p in zip(old_names, probs, strict=True)]
    return CatalogIndex(vectors, rows.ids, labels, class_names, None, rows.images,
                        {"run_id": None}, rows.paths, rows.categories, rows.attributes,
                        rows.schema)  # the new catalog keeps the attributes its schema has
