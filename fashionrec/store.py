"""The living index on disk: a base index file, added segments, removed items, the
saved HNSW graph, and compaction.

Files beside the base ``index.h5``:

* ``index.manifest.json`` — which base file is current (and its ``base_id``), the
  ordered updates since (``{"op": "add", "file": "index.d/seg-*.h5"}``,
  ``{"op": "remove", "ids": [...]}``), the saved search graph (``ann``: file,
  back-end and parameters, the run id, the base it covers and the manifest
  generation it was built at), and a ``generation`` counter that every change raises;
* ``index.d/`` — segment files (the index format), HNSW graphs (FAISS's format),
  and, during a compaction, the new base;
* ``index.lock`` — held (``flock``) by the process that changes any of it.

Every file is complete (temp file, fsync, rename) before the manifest, replaced
atomically the same way, names it, so a reader, or a process killed at any
instant, sees one state or the next, never a mix. A reader checks that the base
file it opened is the one the manifest names (``base_id``) and re-reads the
manifest if a compaction swapped it meanwhile.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import os
import uuid
from pathlib import Path

import numpy as np

from . import search as backends
from .artifacts import flocked, now_iso, read_json, write_json
from .errors import FashionrecError
from .index import CatalogIndex, parse_id

MANIFEST_FORMAT = "fashionrec-index-manifest"


class _Swapped(Exception):
    """The base file changed under a reader (a compaction): read the manifest again."""


class CatalogStore(abc.ABC):
    """The catalog store contract: rows of (id, vector, label, category, image
    reference) that grow and shrink while readers search a consistent snapshot.

    * :meth:`snapshot` — the live rows as a :class:`~fashionrec.index.CatalogIndex`
      whose ``search_rows(queries, k, exclude, allowed)`` answers queries; a snapshot
      never changes, whatever is written after it was taken;
    * :meth:`add` (rows as a ``CatalogIndex`` of standardized vectors) and
      :meth:`remove` (ids), each atomic, each raising the :meth:`generation`;
    * :meth:`compact` — fold the updates into a new base, readers unaffected.

    A store is the catalog of one model version: a write made for a version that is
    no longer published is refused (:class:`~fashionrec.rundir.StaleVersion`).
    """

    @abc.abstractmethod
    def snapshot(self, search=None, log=None):
        """The live rows, searched as the run's search spec says."""

    @abc.abstractmethod
    def add(self, part):
        """Append the rows of ``part``; their ids must not be live already."""

    @abc.abstractmethod
    def remove(self, ids):
        """Remove the rows ``ids``; every one must be live (all or nothing)."""

    @abc.abstractmethod
    def compact(self, search=None, progress=False, log=None):
        """Fold the updates into a new base (and a new search graph)."""

    @abc.abstractmethod
    def generation(self):
        """A number every change raises."""


class IndexStore(CatalogStore):
    """A catalog index on disk that grows and shrinks without being rewritten.

    ``path`` is the base index file (a model version's ``index.h5``, written at
    training or by :meth:`compact`; :meth:`of` takes a version's files). :meth:`add` writes the new items as one segment file under
    ``index.d/`` and then appends ``{"op": "add"}`` to ``index.manifest.json``;
    :meth:`remove` appends ``{"op": "remove", "ids": [...]}``; :meth:`compact` folds
    them into a new base. :meth:`load` replays the operations over the base and
    attaches the search back-end the run uses (the saved HNSW graph for the base,
    exact search for the items added since).

    Example:
        >>> store = IndexStore.of(RunDir("runs/demo").current())  # doctest: +SKIP
        >>> store.remove(["Shoes/Boots/A/12.jpg"])                # doctest: +SKIP
        >>> store.compact()                                       # doctest: +SKIP
        >>> len(store.load())                                     # doctest: +SKIP
    """

    def __init__(self, path, lock_wait=0.0, guard=None, manifest_path=None, segment_dir=None,
                 lock_path=None):
        self.path = Path(path)
        self.lock_wait = lock_wait  # seconds an update waits for another one to finish
        self.guard = guard  # called under the lock before every write (a stale version raises)
        self.manifest_path = Path(manifest_path or self.path.with_suffix(".manifest.json"))
        self.segment_dir = Path(segment_dir or self.path.with_suffix(".d"))
        self.lock_path = Path(lock_path or self.path.with_suffix(".lock"))

    @classmethod
    def of(cls, version, lock_wait=0.0, guard=None):
        """The store of a model version's folder (:class:`~fashionrec.rundir.Version`)."""
        return cls(version.index, lock_wait, guard, version.index_manifest,
                   version.index_segments, version.index_lock)

    def generation(self):
        return self.manifest()["generation"]

    def snapshot(self, search=None, log=None):
        return self.load(search, log)

    # ------------------------------------------------------------ reading
    def manifest(self):
        """The current manifest (an empty one if the index was never updated)."""
        if not self.manifest_path.is_file():
            return {"format": MANIFEST_FORMAT, "format_version": 1, "generation": 0,
                    "base": self.path.name, "ops": []}
        m = read_json(self.manifest_path, "index manifest")
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise FashionrecError(f"{self.manifest_path} is not a fashionrec index manifest")
        ops = m.get("ops")
        if not (isinstance(m.get("generation"), int) and isinstance(ops, list) and all(
                isinstance(op, dict) and (
                    (op.get("op") == "add" and isinstance(op.get("file"), str))
                    or (op.get("op") == "remove" and isinstance(op.get("ids"), list)))
                for op in ops) and isinstance(m.get("base", ""), str)
                and isinstance(m.get("ann") or {}, dict)):
            raise FashionrecError(f"{self.manifest_path} is damaged; deleting it (and "
                                  f"{self.segment_dir}) returns the index to its trained state")
        return m

    def _file(self, name):
        return self.path.parent / name

    def pending(self, m=None):
        """``{"segments": n, "removed": n}``: the added segments and removed ids not
        yet folded into the base (read from the manifest alone)."""
        ops = (m or self.manifest())["ops"]
        return {"segments": sum(op["op"] == "add" for op in ops),
                "removed": sum(len(op.get("ids", ())) for op in ops)}

    def _replay(self, m, read):
        """Replay manifest ``m`` with ``read(path) -> (ids, metadata, base_id, part)``;
        return the base's metadata, the parts and ``{id: (part number, row)}`` of live
        items. Raises :class:`_Swapped` if the base is not the one ``m`` names."""
        base_path = self._file(m.get("base", self.path.name))
        base_ids, base_meta, base_id, base = self._read(read, base_path, m)
        if m.get("base_id", base_id) != base_id:
            raise _Swapped
        run_id = base_meta.get("run_id")
        if m.get("run_id", run_id) != run_id:
            raise FashionrecError(f"{self.manifest_path} belongs to another run than "
                                  f"{self.path}; delete it (and {self.segment_dir}) or re-train")
        parts = [base]
        live = dict(zip(base_ids.tolist(), zip([0] * len(base_ids), range(len(base_ids)),
                                               strict=True), strict=True))
        for op in m["ops"]:
            if op["op"] == "add":
                seg = self._file(op["file"])
                ids, meta, _, part = self._read(read, seg, m)
                if meta.get("run_id") != run_id:
                    raise FashionrecError(f"index segment {seg} belongs to another run")
                live.update({i: (len(parts), r) for r, i in enumerate(ids.tolist())})
                parts.append(part)
            elif op["op"] == "remove":
                for i in op["ids"]:
                    live.pop(i, None)
        return base_meta, parts, live

    def _read(self, read, path, m):
        """``read(path)`` of a file manifest ``m`` names; if it is gone because the
        index changed since ``m`` was read (a compaction deleted it), :class:`_Swapped`."""
        try:
            if not path.is_file():
                raise FileNotFoundError(path)
            return read(path)
        except (FileNotFoundError, FashionrecError):
            if path.is_file():
                raise
            if self.manifest().get("generation") != m["generation"]:
                raise _Swapped from None
            if path == self.path:
                raise FashionrecError(f"index {path} does not exist") from None
            raise FashionrecError(
                f"index file {path} named in {self.manifest_path} is missing; the index is "
                f"damaged (deleting the manifest returns it to its trained state)") from None

    def _consistent(self, read_state):
        """``read_state(manifest)``, read again if a compaction swapped the base."""
        m = self.manifest()
        for _ in range(50):
            try:
                return read_state(m)
            except _Swapped:
                again = self.manifest()
                if again == m:  # nothing moved: the files disagree for good
                    raise self._mismatch(m) from None
                m = again
        raise FashionrecError(f"{self.path} keeps changing under this reader; try again")

    def _mismatch(self, m):
        return FashionrecError(
            f"{self.manifest_path} names a base index other than "
            f"{self._file(m.get('base', self.path.name))}; deleting it (and "
            f"{self.segment_dir}) returns the index to its trained state")

    def load(self, search=None, log=None, progress=False, reuse=None):
        """The live index: the base, plus added segments, minus removed items.

        Args:
            search: the run's search spec (:func:`fashionrec.search.resolve`); with
                ``{"backend": "hnsw", ...}`` the base is searched through its saved
                graph (built in memory, not saved, if it is missing, stale or damaged),
                and the items added since are searched exactly.
            log: where a graph built in memory is announced.
            reuse: an earlier snapshot of this store: its graph is used again when the
                base and the parameters are the same (a reload after an add).
        """
        return self._consistent(lambda m: self._load(m, search, log, progress, reuse))

    def _load(self, m, search, log, progress, reuse=None):
        def read(path):
            # only the base is memory-mapped (a mapping holds a file descriptor);
            # segments are small and read into memory, so a load keeps one file open
            # however many segments there are
            index = CatalogIndex.load(path, mmap=path == base_path)
            return index.ids, index.metadata, index.base_id, index

        base_path = self._file(m.get("base", self.path.name))

        base_meta, parts, live = self._replay(m, read)
        base = parts[0]
        if len(parts) == 1 and len(live) == len(base):
            index, base_rows = base, None
        else:
            rows = [[] for _ in parts]
            for p, r in live.values():
                rows[p].append(r)
            rows = [np.sort(np.asarray(r, dtype=np.int64)) for r in rows]
            index, base_rows = CatalogIndex.concat(parts, rows), rows[0]
        index.metadata = {**base_meta, "generation": m["generation"],
                          "n_updates": len(m["ops"])}
        index.base_id = base.base_id
        index.query_expansion = (search or {}).get("query_expansion")
        if search and search.get("backend") == "hnsw":
            ann = _graph_of(reuse, base.base_id, search) or self._graph(m, base, search, log,
                                                                       progress)
            if base_rows is None:
                index.backend = ann
            else:
                tail = index.vectors[len(base_rows):]
                index.backend = backends.LiveSearch(
                    ann, base_rows, backends.ExactSearch(tail) if len(tail) else None)
        return index

    def live_ids(self, m=None):
        """``(live ids, base header)`` read from the ids alone (no vectors): what an
        update needs to check, at a cost that does not grow with the vectors."""
        def read(path):
            ids, meta, class_names, dim, base_id = CatalogIndex.read_header(path)
            return ids, meta, base_id, (ids, meta, class_names, dim)

        if m is not None:  # under the lock: nothing can move, a mismatch is for good
            try:
                _, parts, live = self._replay(m, read)
            except _Swapped:
                raise self._mismatch(m) from None
        else:
            _, parts, live = self._consistent(lambda m: self._replay(m, read))
        return set(live), parts[0]

    # ------------------------------------------------------------ the HNSW graph
    def _graph(self, m, base, search, log, progress):
        """The HNSW graph of ``base``: the saved one if it is sound, else one built in
        memory. A reader never writes a graph: only training, ``index`` and
        ``compact`` do (they hold the lock and know the run's parameters)."""
        entry = m.get("ann") or {}
        problem = None
        if not entry:
            problem = "no HNSW graph is saved for this index"
        elif entry.get("base_id") != base.base_id or entry.get("n") != len(base):
            problem = f"the saved HNSW graph {entry.get('file')} is stale (built for another base)"
        elif (entry.get("m"), entry.get("ef_construction")) != (
                search.get("m"), search.get("ef_construction")):
            problem = "the saved HNSW graph was built with other parameters"
        else:
            path = self._file(entry["file"])
            try:
                if not path.is_file() or path.stat().st_size != entry.get("bytes"):
                    raise FashionrecError(f"{path} is missing or not the size recorded")
                return backends.load_graph(path, base.vectors, search)
            except FashionrecError as exc:
                problem = f"the saved HNSW graph is damaged ({exc})"
        if log:
            log(f"search: {problem}; building it in memory over {len(base)} items "
                f"(`fashionrec index` saves one)")
        return backends.build(search, base.vectors, progress=progress)

    def _save_graph(self, ann, base, m):
        """Write ``ann`` (the graph of ``base``) under ``index.d/``; its manifest entry."""
        name = f"ann-{uuid.uuid4().hex[:12]}.faiss"
        record = ann.save(self.segment_dir / name)
        return {"file": f"{self.segment_dir.name}/{name}", **record,
                "run_id": base.metadata.get("run_id"), "base_id": base.base_id,
                "generation": m["generation"] + 1, "built": now_iso()}

    def write_base(self, index, progress=False):
        """Make ``index`` the base (training): forget every update, write the file and,
        when its back-end is an HNSW graph, save the graph and name it in the manifest."""
        with self._locked():
            self._reset()
            base_id = uuid.uuid4().hex
            index.save(self.path, base_id=base_id)
            index.base_id = base_id
            if index.backend.name == "hnsw":
                m = {**self.manifest(), "base_id": base_id,
                     "run_id": index.metadata.get("run_id")}
                m["ann"] = self._save_graph(index.backend, index, m)
                self._publish(m)
        return self.path

    def build_graph(self, search, progress=False, log=None):
        """(Re)build the saved search graph of the current base for ``search`` (a spec);
        ``{"backend": "exact"}`` drops it. Items added since stay searched exactly until
        :meth:`compact`. Returns the new manifest."""
        say = log or (lambda *_: None)
        with self._locked():
            m = self.manifest()
            base = CatalogIndex.load(self._file(m.get("base", self.path.name)))
            m = {**m, "base_id": base.base_id, "run_id": base.metadata.get("run_id")}
            if search.get("backend") == "hnsw":
                say(f"search: building the HNSW graph over {len(base)} items")
                m["ann"] = self._save_graph(
                    backends.build(search, base.vectors, progress=progress), base, m)
            else:
                m.pop("ann", None)
            m = self._publish(m)
            self._clean_orphans(m)
            return m

    # ------------------------------------------------------------ updating
    @contextlib.contextmanager
    def _locked(self):
        """The store's lock; a write then checks its model version is still the
        published one (``guard``), so no write lands in a retired version."""
        if self.guard is not None:  # before the lock file is made: a retired version's
            self.guard()  # folder may be gone
        with flocked(self.lock_path, self.lock_wait,
                     f"{self.path} is being updated by another process"):
            if self.guard is not None:
                self.guard()
            yield

    def _publish(self, manifest):
        manifest = {**manifest, "generation": manifest["generation"] + 1, "updated": now_iso()}
        write_json(self.manifest_path, manifest)
        return manifest

    def _clean_orphans(self, manifest):
        """Delete files under ``index.d/`` that the manifest does not name (left by a
        killed update, or replaced by a compaction)."""
        named = {self._file(op["file"]) for op in manifest["ops"] if op["op"] == "add"}
        named.add(self._file(manifest.get("base", self.path.name)))
        if manifest.get("ann"):
            named.add(self._file(manifest["ann"]["file"]))
        if self.segment_dir.is_dir():
            for f in self.segment_dir.iterdir():
                if f.is_file() and f not in named:
                    f.unlink(missing_ok=True)

    def _stamp(self, m, base_id, run_id):
        """``m`` naming the base it applies to."""
        return {**m, "base_id": m.get("base_id", base_id), "run_id": m.get("run_id", run_id)}

    def add(self, part):
        """Append the items of ``part`` (a :class:`CatalogIndex` whose vectors were
        standardized with this index's scaler); their ids must not be live already."""
        with self._locked():
            m = self.manifest()
            live, (base_ids, base_meta, class_names, dim) = self.live_ids(m)
            self._clean_orphans(m)
            if part.class_names != class_names or part.dim != dim:
                raise FashionrecError("the new items were embedded for another model")
            kind = "int" if base_ids.dtype.kind in "iu" else "str"
            if len(part) and part.id_kind != kind:
                raise FashionrecError(f"this index's ids are {kind}s; the new items' are not")
            clash = [i for i in part.ids.tolist() if i in live]
            if clash:
                raise FashionrecError(f"{len(clash)} id(s) already in the index, e.g. "
                                      f"{clash[0]!r}; remove them first")
            run_id = base_meta.get("run_id")
            name = f"seg-{m['generation'] + 1:06d}-{uuid.uuid4().hex[:8]}.h5"
            part = copy.copy(part)  # the caller's object keeps its metadata
            part.metadata = {"run_id": run_id, "added": now_iso()}
            part.save(self.segment_dir / name)
            m = self._stamp(m, self._base_id(m), run_id)
            m["ops"] = [*m["ops"], {"op": "add", "file": f"{self.segment_dir.name}/{name}",
                                    "n": len(part), "at": now_iso()}]
            return self._publish(m)

    def remove(self, ids):
        """Remove the items ``ids``; every one must be in the index."""
        with self._locked():
            m = self.manifest()
            live, (base_ids, base_meta, _, _) = self.live_ids(m)
            self._clean_orphans(m)
            kind = "int" if base_ids.dtype.kind in "iu" else "str"
            ids = [parse_id(i, kind) for i in ids]
            unknown = [i for i in ids if i not in live]
            if unknown:
                raise FashionrecError(f"{len(unknown)} id(s) not in the index, e.g. "
                                      f"{unknown[0]!r}; nothing was removed")
            m = self._stamp(m, self._base_id(m), base_meta.get("run_id"))
            m["ops"] = [*m["ops"], {"op": "remove", "ids": list(dict.fromkeys(ids)),
                                    "at": now_iso()}]
            return self._publish(m)

    def locked(self):
        """The store's lock, for a caller that must keep writers out while it reads
        and acts (a retrain's publish)."""
        return self._locked()

    def read_with_history(self):
        """``(live index, added, removed)`` read at one generation (under the lock, so
        no write lands between them): see :meth:`history`."""
        with self._locked():
            m = self.manifest()
            added, removed = self.history(m)
            return self._load(m, None, None, False), added, removed

    def history(self, m=None):
        """``(added, removed)``: ids added since the model was trained and still live,
        and ids removed since it was first trained (both kept through compactions and
        retrains: a retrain carries the added ones over and does not bring a removed
        one back)."""
        live, (base_ids, base_meta, _, _) = self.live_ids(m)
        m = self.manifest() if m is None else m
        added, gone = set(base_meta.get("added_ids", [])), set(base_meta.get("removed_ids", []))
        gone |= set(base_ids.tolist())
        for op in m["ops"]:
            if op["op"] == "add":
                added.update(CatalogIndex.read_header(self._file(op["file"]))[0].tolist())
            gone.update(op.get("ids", []))
        return sorted(added & live, key=str), sorted(gone - live, key=str)

    def _base_id(self, m):
        return CatalogIndex.read_header(self._file(m.get("base", self.path.name)))[4]

    def compact(self, search=None, progress=False, log=None):
        """Fold the added segments and removed items into a new base (and, for an HNSW
        ``search`` spec, a new graph over all of it), atomically.

        The steps, each leaving a state a reader can use: the new base is written
        under ``index.d/`` and its graph beside it; one manifest names them (no
        updates left); ``index.h5`` is replaced by the new base (a hard link, no
        copy); a second manifest names ``index.h5``; files no manifest names are
        deleted. A process killed at any step leaves the old or the new index, and
        the next update or compaction removes what it left.

        Returns:
            The new manifest, or the current one if there was nothing to fold.
        """
        say = log or (lambda *_: None)
        hnsw = bool(search) and search.get("backend") == "hnsw"
        with self._locked():
            m = self.manifest()
            if not m["ops"] and m.get("base", self.path.name) == self.path.name and (
                    not hnsw or m.get("ann")):
                self._clean_orphans(m)
                say("compact: nothing to fold (no updates since the index was written)")
                return m
            added, removed = self.history(m)
            index = self._load(m, None, None, progress)
            meta = {k: v for k, v in index.metadata.items()
                    if k not in ("generation", "n_updates")}
            meta.update(added_ids=added, removed_ids=removed)
            index.metadata = {**meta, "compacted": now_iso()}
            base_id = uuid.uuid4().hex
            new = self.segment_dir / f"base-{m['generation'] + 1:06d}-{base_id[:8]}.h5"
            index.save(new, base_id=base_id)
            index = CatalogIndex.load(new)  # memory-mapped: the graph is built from it
            nxt = {**m, "base": f"{self.segment_dir.name}/{new.name}", "base_id": base_id,
                   "run_id": meta.get("run_id"), "ops": [], "compacted": now_iso()}
            nxt.pop("ann", None)
            if hnsw:
                say(f"compact: building the HNSW graph over {len(index)} items")
                nxt["ann"] = self._save_graph(
                    backends.build(search, index.vectors, progress=progress), index, m)
            nxt = self._publish(nxt)
            _replace_by_link(new, self.path)
            final = self._publish({**nxt, "base": self.path.name})
            self._clean_orphans(final)
            say(f"compact: {len(m['ops'])} update(s) folded; {len(index)} items in "
                f"{self.path}")
            return final

    def _reset(self):
        """Forget every update (a new base is being written)."""
        self.manifest_path.unlink(missing_ok=True)
        if self.segment_dir.is_dir():
            for f in self.segment_dir.iterdir():
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.segment_dir.rmdir()


def _graph_of(snapshot, base_id, search):
    """The HNSW graph of an earlier snapshot, if it covers base ``base_id`` with the
    parameters of ``search``."""
    if snapshot is None or snapshot.base_id != base_id:
        return None
    ann = getattr(snapshot.backend, "ann", snapshot.backend)
    if ann.name != "hnsw" or ann.params() != {"backend": "hnsw",
                                               **backends.graph_params(search)}:
        return None
    return ann


def _replace_by_link(src, dst):
    """Make ``dst`` name the file ``src`` atomically (a hard link renamed over it; a
    copy where links are not supported)."""
    import shutil

    from .artifacts import atomic_path

    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
