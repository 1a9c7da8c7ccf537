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

import contextlib
import copy
import os
import time
import uuid
from pathlib import Path

import numpy as np

from .artifacts import now_iso, read_json, write_json
from .errors import FashionrecError
from .index import CatalogIndex, parse_id
from .search import ExactSearch, LiveSearch

MANIFEST_FORMAT = "fashionrec-index-manifest"


class _Swapped(Exception):
    """The base file changed under a reader (a compaction): read the manifest again."""


class IndexStore:
    """A catalog index on disk that grows and shrinks without being rewritten.

    ``path`` is the base index file (``RUN_DIR/index.h5``, written at training or by
    :meth:`compact`). :meth:`add` writes the new items as one segment file under
    ``index.d/`` and then appends ``{"op": "add"}`` to ``index.manifest.json``;
    :meth:`remove` appends ``{"op": "remove", "ids": [...]}``; :meth:`compact` folds
    them into a new base. :meth:`load` replays the operations over the base and
    attaches the search back-end the run uses (the saved HNSW graph for the base,
    exact search for the items added since).

    Example:
        >>> store = IndexStore("runs/demo/index.h5")              # doctest: +SKIP
        >>> store.remove(["Shoes/Boots/A/12.jpg"])                # doctest: +SKIP
        >>> store.compact()                                       # doctest: +SKIP
        >>> len(store.load())                                     # doctest: +SKIP
    """

    def __init__(self, path, lock_wait=0.0):
        self.path = Path(path)
        self.lock_wait = lock_wait  # seconds an update waits for another one to finish
        self.manifest_path = self.path.with_suffix(".manifest.json")
        self.segment_dir = self.path.with_suffix(".d")
        self.lock_path = self.path.with_suffix(".lock")

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

    def load(self, search=None, log=None, progress=False):
        """The live index: the base, plus added segments, minus removed items.

        Args:
            search: the run's search spec (:func:`fashionrec.search.resolve`); with
                ``{"backend": "hnsw", ...}`` the base is searched through its saved
                graph, rebuilt (and saved, when this process may) if it is missing,
                stale or damaged, and the items added since are searched exactly.
            log: where a rebuild is announced.
        """
        return self._consistent(lambda m: self._load(m, search, log, progress))

    def _load(self, m, search, log, progress):
        def read(path):
            index = CatalogIndex.load(path)
            return index.ids, index.metadata, index.base_id, index

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
        if search and search.get("backend") == "hnsw":
            ann = self._graph(m, base, search, log, progress)
            if base_rows is None:
                index.backend = ann
            else:
                tail = index.vectors[len(base_rows):]
                index.backend = LiveSearch(ann, base_rows, ExactSearch(tail) if len(tail)
                                           else None)
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
        """The HNSW graph of ``base``: the saved one if it is sound, else rebuilt."""
        from .search.hnsw import HNSWSearch

        params = {k: search[k] for k in ("m", "ef_construction", "ef_search",
                                         "filter_exact_max") if k in search}
        entry = m.get("ann") or {}
        problem = None
        if not entry:
            problem = "no HNSW graph is saved for this index"
        elif entry.get("base_id") != base.base_id or entry.get("n") != len(base):
            problem = f"the saved HNSW graph {entry.get('file')} is stale (built for another base)"
        elif (entry.get("m"), entry.get("ef_construction")) != (
                params.get("m"), params.get("ef_construction")):
            problem = "the saved HNSW graph was built with other parameters"
        else:
            path = self._file(entry["file"])
            try:
                if not path.is_file() or path.stat().st_size != entry.get("bytes"):
                    raise FashionrecError(f"{path} is missing or not the size recorded")
                ann = HNSWSearch.load(path, base.vectors, **params)
                _check_graph(ann, base.vectors)
                return ann
            except FashionrecError as exc:
                problem = f"the saved HNSW graph is damaged ({exc})"
        say = log or (lambda *_: None)
        say(f"search: {problem}; building it over {len(base)} items")
        ann = HNSWSearch.build(base.vectors, **params, progress=progress)
        try:
            with self._locked():
                current = self.manifest()
                if current.get("base_id", base.base_id) == base.base_id:
                    self._clean_orphans(self._publish({
                        **current, "base_id": base.base_id,
                        "ann": self._save_graph(ann, base, current)}))
                    say("search: HNSW graph saved")
        except (FashionrecError, OSError) as exc:
            say(f"search: the rebuilt HNSW graph is used but not saved ({exc})")
        return ann

    def _save_graph(self, ann, base, m):
        """Write ``ann`` (the graph of ``base``) under ``index.d/``; its manifest entry."""
        name = f"ann-{uuid.uuid4().hex[:12]}.faiss"
        path = self.segment_dir / name
        ann.save(path)
        import faiss

        return {"file": f"{self.segment_dir.name}/{name}", **ann.params(),
                "run_id": base.metadata.get("run_id"), "base_id": base.base_id,
                "generation": m["generation"] + 1, "n": len(base),
                "dim": int(base.vectors.shape[1]), "bytes": path.stat().st_size,
                "faiss": faiss.__version__, "built": now_iso()}

    def write_base(self, index, progress=False):
        """Make ``index`` the base (training): forget every update, write the file and,
        when its back-end is an HNSW graph, save the graph and name it in the manifest."""
        from .search.hnsw import HNSWSearch

        with self._locked():
            self._reset()
            base_id = uuid.uuid4().hex
            index.save(self.path, base_id=base_id)
            index.base_id = base_id
            if isinstance(index.backend, HNSWSearch):
                m = {**self.manifest(), "base_id": base_id,
                     "run_id": index.metadata.get("run_id")}
                m["ann"] = self._save_graph(index.backend, index, m)
                self._publish(m)
        return self.path

    def build_graph(self, search, progress=False, log=None):
        """(Re)build the saved search graph of the current base for ``search`` (a spec);
        ``{"backend": "exact"}`` drops it. Items added since stay searched exactly until
        :meth:`compact`. Returns the new manifest."""
        from .search.hnsw import HNSWSearch

        say = log or (lambda *_: None)
        with self._locked():
            m = self.manifest()
            base = CatalogIndex.load(self._file(m.get("base", self.path.name)))
            m = {**m, "base_id": base.base_id, "run_id": base.metadata.get("run_id")}
            if search.get("backend") == "hnsw":
                say(f"search: building the HNSW graph over {len(base)} items")
                params = {k: v for k, v in search.items() if k != "backend"}
                m["ann"] = self._save_graph(HNSWSearch.build(base.vectors, **params,
                                                             progress=progress), base, m)
            else:
                m.pop("ann", None)
            m = self._publish(m)
            self._clean_orphans(m)
            return m

    # ------------------------------------------------------------ updating
    @contextlib.contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            yield
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            deadline = time.monotonic() + self.lock_wait
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise FashionrecError(f"{self.path} is being updated by another "
                                              f"process (lock {self.lock_path})") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

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
        from .search.hnsw import HNSWSearch

        say = log or (lambda *_: None)
        hnsw = bool(search) and search.get("backend") == "hnsw"
        with self._locked():
            m = self.manifest()
            if not m["ops"] and m.get("base", self.path.name) == self.path.name and (
                    not hnsw or m.get("ann")):
                self._clean_orphans(m)
                say("compact: nothing to fold (no updates since the index was written)")
                return m
            index = self._load(m, None, None, progress)
            meta = {k: v for k, v in index.metadata.items()
                    if k not in ("generation", "n_updates")}
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
                params = {k: v for k, v in search.items() if k != "backend"}
                nxt["ann"] = self._save_graph(
                    HNSWSearch.build(index.vectors, **params, progress=progress), index, m)
            nxt = self._publish(nxt)
            _replace_by_link(new, self.path)
            final = self._publish({**nxt, "base": self.path.name})
            self._clean_orphans(final)
            say(f"compact: {len(m['ops'])} update(s) folded; {len(index)} items in "
                f"{self.path}")
            return final

    def _reset(self):
        """Forget every update (a new base is being written by training)."""
        self.manifest_path.unlink(missing_ok=True)
        if self.segment_dir.is_dir():
            for f in self.segment_dir.iterdir():
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.segment_dir.rmdir()

    def reset(self):
        """Forget every update (used when a new base is written by training)."""
        with self._locked():
            self._reset()


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


def _check_graph(ann, vectors, n=16):
    """A loaded graph must hold the index's own vectors at a few rows spread over it
    (a cheap guard against a file that reads but belongs to other vectors)."""
    rows = np.linspace(0, len(vectors) - 1, min(n, len(vectors))).astype(np.int64)
    stored = np.stack([ann.index.reconstruct(int(r)) for r in rows])
    if not np.array_equal(stored, np.asarray(vectors[rows], dtype=np.float32)):
        raise FashionrecError("its vectors are not the index's")
