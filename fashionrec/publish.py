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

import numpy as np

from . import search
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

    @property
    def config(self):
        """The settings, derived from the record (their one copy)."""
        return RunConfig.of_run(self.metadata)

    def store(self, lock_wait=0.0):
        """The version's catalog store; its writes are refused once another version
        is published."""
        return IndexStore.of(self.version, lock_wait, guard=self.check_current)

    def refreshed(self, log=None):
        """This version with its record and catalog read again (after writes, by this
        or another process); :class:`StaleVersion` if another version is published."""
        meta = self.run.read()
        if self.run.version_of(meta).folder.resolve() != self.version.folder.resolve():
            raise StaleVersion(f"{self.run.path} now publishes another version")
        index = IndexStore.of(self.version).load(meta.get("search") or {"backend": "exact"},
                                                 log=log)
        return replace(self, metadata=meta, index=index)

    def stats(self):
        """What is served: items, classes, the run, its catalog and search (no paths)."""
        meta, index = self.metadata, self.index
        search = meta.get("search") or {"backend": "exact"}
        return {"items": len(index), "classes": list(index.class_names),
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
    index = IndexStore.of(version).load(search, log=log)
    run_id = meta["run_id"]
    if index.metadata.get("run_id") != run_id:
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


def _legacy_scaler(index, version):
    if index.scaler is None:
        raise FashionrecError(f"{version.embedder} does not exist")
    return index.scaler


# ---------------------------------------------------------------- publishing
def publish(trained, run_dir, force=False, log=print):
    """Write ``trained`` (:class:`~fashionrec.training.Trained`) as the new published
    version of ``run_dir``, carrying the living catalog over; returns its
    :class:`Loaded`."""
    say = log or (lambda *_: None)
    run = RunDir(run_dir)
    run.check_target(force)
    with run.locked():
        previous = load_version(run.path, log=None) if run.exists() else None
        meta = trained.metadata
        version = run.new_version(meta["run_id"])
        index, seen = trained.index, None
        if previous is not None and _compatible(previous, trained, say):
            seen = previous.index
            index = _carry(trained, index, seen, previous.store().removed_ids(), say)
        store = IndexStore.of(version)
        _write(trained, version, store, index)
        if seen is None:
            run.publish(version, meta)
        else:
            with previous.store(lock_wait=600.0)._locked():  # writers to the old wait
                _catch_up(trained, store, seen, previous.store().load(), say)
                run.publish(version, meta)
    return load_version(run.path, log=None)


def _write(trained, version, store, index):
    run_id = trained.metadata["run_id"]
    trained.embedder.save(version, run_id)
    store.write_base(index)
    if trained.report is not None:
        write_json(version.report, trained.report)
    if trained.split is not None:
        write_json(version.split, {"run_id": run_id, **trained.split.to_dict()})


def _compatible(previous, trained, say):
    old, new = previous.index, trained.index
    kind = previous.metadata.get("dataset", {}).get("kind")
    if kind == trained.metadata["dataset"]["kind"] and (
            not len(old) or old.id_kind == new.id_kind):
        return True
    say(f"publish: the previous run in {previous.run.path} is another kind of catalog; "
        f"its {len(old)} products are not carried over")
    return False


def _carry(trained, index, old, removed, say):
    """The new catalog: the new training's products without those ``removed`` from the
    previous version, plus the previous version's products it does not have,
    re-embedded by the new model."""
    removed = set(removed)
    keep = np.array([i not in removed for i in index.ids.tolist()], dtype=bool)
    extra = np.flatnonzero(~np.isin(old.ids, index.ids))
    if keep.all() and not len(extra):
        return index
    parts, rows = [index], [np.flatnonzero(keep)]
    if len(extra):
        parts.append(reembed(trained.embedder, index.class_names, old.take(extra)))
        rows.append(None)
    say(f"publish: {len(extra)} product(s) added since the last train re-embedded by the "
        f"new model, {int((~keep).sum())} removed one(s) left out")
    out = CatalogIndex.concat(parts, rows)
    out.metadata = {**index.metadata, "removed_ids": sorted(removed, key=str)}
    spec = trained.metadata["search"]
    if spec["backend"] != "exact":  # the graph is built over the whole new catalog
        out.backend = search.build(spec, out.vectors)
    return out


def _catch_up(trained, store, seen, now, say):
    """Apply to the new version's store what was written to the previous one after
    ``seen`` was read (under the previous store's lock, so nothing more arrives)."""
    before, after = set(seen.ids.tolist()), set(now.ids.tolist())
    added = [now.row_of(i) for i in now.ids.tolist() if i not in before]
    current = store.load()
    gone = [i for i in before - after if current.row_of(i) is not None]
    if added:
        store.add(reembed(trained.embedder, trained.index.class_names,
                          now.take(np.array(added))))
    if gone:
        store.remove(gone)
    if added or gone:
        say(f"publish: {len(added)} add(s) and {len(gone)} removal(s) made during the "
            f"retrain applied to the new version")


def reembed(embedder, class_names, rows):
    """``rows`` (a :class:`CatalogIndex` of another model's products) embedded by
    ``embedder`` from their stored images; a class the new model does not know is
    replaced by its prediction."""
    if rows.images is not None:
        probs, vectors = embedder.encode_images(rows.images.astype(np.float32))
    else:
        missing = [i for i, p in zip(rows.ids.tolist(), rows.paths, strict=True) if not p]
        if missing:
            raise FashionrecError(f"product {missing[0]!r} has no image to re-embed")
        cat = Catalog.from_files(rows.paths, ids=rows.ids.tolist())
        cat.sha256 = [""] * len(cat)
        views, failed = embedder.catalog_features(cat, progress=False)
        if failed:
            row, why = next(iter(failed.items()))
            raise FashionrecError(f"cannot carry product {rows.ids[row]!r} over to the new "
                                  f"model: {why}; restore its image or remove the product")
        probs, vectors = embedder.encode_features(views)
    old_names = [rows.class_names[label] for label in rows.labels]
    labels = [class_names.index(n) if n in class_names else int(p.argmax())
              for n, p in zip(old_names, probs, strict=True)]
    return CatalogIndex(vectors, rows.ids, labels, class_names, None, rows.images,
                        {"run_id": None}, rows.paths, rows.categories)
