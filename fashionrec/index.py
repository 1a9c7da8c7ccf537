"""Stage 4 — index: the catalog's embeddings, re-standardized, in one HDF5 file,
ranked by exact Euclidean distance.

Layout of ``index.h5`` (no pickle; every array is a plain HDF5 dataset):

* attrs ``format = "fashionrec-index"``, ``format_version``, ``metadata`` (JSON),
  ``id_kind`` (``"int"`` or ``"str"``)
* ``vectors`` (N, D) float32 — standardized embeddings
* ``ids`` (N,) int64 or strings — a test-split index, or a product id
* ``labels`` (N,) int64 and ``class_names`` (C,) strings
* ``scaler/mean``, ``scaler/scale``, ``scaler/var``, ``scaler/n_samples_seen``
* optional, for showing and filtering results: ``images`` (N, H, W) uint8 (the
  Fashion-MNIST catalog images), ``paths`` (N,) strings (a product's image file),
  ``categories`` (N,) strings (``/``-joined category path)

:class:`IndexStore` makes such a file a *living* index: products are added as
small segment files (``index.d/seg-*.h5``, the same format) and removed as
tombstones, both recorded in ``index.manifest.json``; the base file is never
rewritten. Every file is complete before the manifest, replaced atomically,
names it, so a process killed mid-update leaves the index as it was before.
"""

from __future__ import annotations

import contextlib
import copy
import json
import uuid
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial.distance import cdist
from sklearn.preprocessing import StandardScaler

from .artifacts import (
    atomic_path,
    now_iso,
    read_json,
    scaler_from_arrays,
    scaler_to_arrays,
    write_json,
)
from .errors import FashionrecError

FORMAT = "fashionrec-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FORMAT = "fashionrec-index-manifest"


def knn_search(queries, vectors, k, exclude=None, block_size=8192, query_block=1024):
    """Exact k nearest neighbours by Euclidean distance, in blocks.

    Args:
        queries: ``(M, D)`` array.
        vectors: ``(N, D)`` array (or anything sliceable by rows, e.g. an h5py dataset).
        k: neighbours per query (capped at the number of candidates).
        exclude: optional ``(M,)`` row numbers (``-1`` for none) each query must not
            get back, e.g. the query's own row when it is in the catalog.
        block_size, query_block: catalog rows and queries compared at a time; memory
            is ``O(query_block * block_size)``, never ``O(M * N)``.

    Returns:
        ``(rows, distances)``, both ``(M, k)``, nearest first; equal distances are
        listed by row.
    """
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    n, m = vectors.shape[0], queries.shape[0]
    k = int(min(k, n - (exclude is not None)))
    if k < 1:
        raise FashionrecError("the catalog has too few items for this query")
    exclude = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    rows = np.empty((m, k), dtype=np.int64)
    dists = np.empty((m, k))
    for q0 in range(0, m, query_block):
        q = queries[q0:q0 + query_block]
        ex = None if exclude is None else exclude[q0:q0 + query_block]
        rows[q0:q0 + len(q)], dists[q0:q0 + len(q)] = _knn_block(q, vectors, k, ex, block_size)
    return rows, dists


def _knn_block(queries, vectors, k, exclude, block_size):
    m = len(queries)
    best_d = np.full((m, 0), np.inf)
    best_i = np.zeros((m, 0), dtype=np.int64)
    for start in range(0, vectors.shape[0], block_size):
        block = np.asarray(vectors[start:start + block_size], dtype=np.float64)
        d = cdist(queries, block)
        if exclude is not None:
            local = exclude - start
            hit = (local >= 0) & (local < len(block))
            d[np.nonzero(hit)[0], local[hit]] = np.inf
        cand_d = np.concatenate([best_d, d], axis=1)
        cand_i = np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + len(block)), d.shape)], axis=1)
        if cand_d.shape[1] > k:
            part = np.argpartition(cand_d, k - 1, axis=1)[:, :k]
            cand_d = np.take_along_axis(cand_d, part, axis=1)
            cand_i = np.take_along_axis(cand_i, part, axis=1)
        best_d, best_i = cand_d, cand_i
    order = np.lexsort((best_i, best_d), axis=1)
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_d, order, axis=1)


class CatalogIndex:
    """The recommendation catalog: standardized embeddings plus what to show.

    Build it with :meth:`build` from raw embeddings (it fits the re-standardizing
    scaler), query it with :meth:`search`, persist it with :meth:`save` / :meth:`load`.

    Args:
        vectors: ``(N, D)`` standardized embeddings.
        ids: ``(N,)`` unique item ids, all integers or all strings.
        labels: ``(N,)`` class numbers into ``class_names``.
        scaler: the fitted StandardScaler that standardizes raw embeddings.
        images, paths, categories: optional per-item arrays (see the module doc).
        metadata: a JSON-able dict saved with the index.
    """

    def __init__(self, vectors, ids, labels, class_names, scaler, images=None, metadata=None,
                 paths=None, categories=None):
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.ids = _as_ids(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.scaler = scaler
        self.images = None if images is None else np.asarray(images, dtype=np.uint8)
        self.paths = None if paths is None else _as_strings(paths)
        self.categories = None if categories is None else _as_strings(categories)
        self.metadata = dict(metadata or {})
        n = len(self.vectors)
        if any(a is not None and len(a) != n for a in (
                self.ids, self.labels, self.images, self.paths, self.categories)):
            raise FashionrecError("index arrays disagree in length")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise FashionrecError("index labels out of range of its class names")
        self._row_of = {i: r for r, i in enumerate(self.ids.tolist())}  # Python int or str
        if len(self._row_of) != n:
            raise FashionrecError("index ids are not unique")

    @classmethod
    def build(cls, embeddings, ids, labels, class_names, images=None, metadata=None,
              paths=None, categories=None):
        scaler = StandardScaler().fit(np.asarray(embeddings, dtype=np.float64))
        vectors = scaler.transform(np.asarray(embeddings, dtype=np.float64))
        return cls(vectors, ids, labels, class_names, scaler, images, metadata, paths, categories)

    def __len__(self):
        return len(self.ids)

    @property
    def dim(self):
        return self.vectors.shape[1]

    @property
    def id_kind(self):
        return "int" if self.ids.dtype.kind in "iu" else "str"

    def parse_id(self, item_id):
        """``item_id`` as this index's id type (``"17"`` -> ``17`` for integer ids)."""
        return parse_id(item_id, self.id_kind)

    def row_of(self, item_id):
        """Row of catalog item ``item_id`` or ``None``."""
        try:
            return self._row_of.get(self.parse_id(item_id))
        except FashionrecError:
            return None

    def category_of(self, row):
        """An item's category path: its stored category, else its class name."""
        return self.all_categories()[row]

    def all_categories(self):
        """Every item's category path (computed once per index)."""
        if getattr(self, "_categories", None) is None:
            out = np.asarray(self.class_names, dtype=object)[self.labels]
            if self.categories is not None:
                given = self.categories != ""
                out[given] = self.categories[given]
            self._categories = out
        return self._categories

    def transform(self, embeddings):
        """Standardize raw embeddings with the catalog's scaler."""
        return self.scaler.transform(np.atleast_2d(np.asarray(embeddings, dtype=np.float64)))

    def search(self, vectors, k=6, exclude_ids=None):
        """``(rows, distances)`` of the ``k`` catalog items nearest to each
        standardized query vector; ``exclude_ids`` (one per query, or ``None``)
        are never returned."""
        exclude = None
        if exclude_ids is not None:
            exclude = np.array([-1 if (r := self.row_of(i)) is None else r
                                for i in np.atleast_1d(exclude_ids)], dtype=np.int64)
        return self.search_rows(vectors, k, exclude)

    def search_rows(self, vectors, k=6, exclude_rows=None, allowed_rows=None):
        """Like :meth:`search`, excluding catalog rows (``-1``: none) instead of ids;
        ``allowed_rows`` restricts the search to those rows (e.g. one category)."""
        if allowed_rows is None:
            return knn_search(vectors, self.vectors, k, exclude_rows)
        allowed = np.asarray(allowed_rows, dtype=np.int64)
        local = None
        if exclude_rows is not None:
            pos = {int(r): i for i, r in enumerate(allowed)}
            local = np.array([pos.get(int(r), -1) for r in np.atleast_1d(exclude_rows)])
        rows, dists = knn_search(vectors, self.vectors[allowed], k, local)
        return allowed[rows], dists

    def take(self, rows):
        """A new index of the items at ``rows`` (same scaler, classes and metadata)."""
        return CatalogIndex.concat([self], [rows])

    @classmethod
    def concat(cls, parts, rows=None):
        """One index of the items of ``parts`` (all, or ``rows[i]`` of part ``i``), in
        order, with the first part's scaler and metadata. Each array is gathered
        straight into its result, so memory holds the parts plus one copy."""
        first = parts[0]
        rows = [np.arange(len(p)) if r is None else np.asarray(r, dtype=np.int64)
                for p, r in zip(parts, rows or [None] * len(parts), strict=True)]
        for p, r in zip(parts[1:], rows[1:], strict=True):
            if p.class_names != first.class_names or p.dim != first.dim:
                raise FashionrecError("index parts have different classes or dimensions")
            if p.id_kind != first.id_kind and len(r):
                raise FashionrecError("index parts mix integer and string ids")
        if len({p.images is None for p in parts}) > 1:
            raise FashionrecError("index parts disagree on storing images")

        def gather(name, fill=None):
            arrays = [getattr(p, name) for p in parts]
            if all(a is None for a in arrays):
                return None
            like = next(a for a in arrays if a is not None)
            out = np.empty((sum(map(len, rows)), *like.shape[1:]), dtype=like.dtype)
            start = 0
            for a, r in zip(arrays, rows, strict=True):
                if a is None:
                    out[start:start + len(r)] = fill
                else:
                    np.take(a, r, axis=0, out=out[start:start + len(r)], mode="clip")
                start += len(r)
            return out

        return cls(gather("vectors"), gather("ids"), gather("labels"), first.class_names,
                   first.scaler, gather("images"), first.metadata,
                   gather("paths", ""), gather("categories", ""))

    def save(self, path):
        """Write the index to ``path`` atomically."""
        strings = h5py.string_dtype()
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["metadata"] = json.dumps(self.metadata)
                f.attrs["id_kind"] = self.id_kind
                f.create_dataset("vectors", data=self.vectors)
                if self.id_kind == "int":
                    f.create_dataset("ids", data=self.ids)
                else:
                    f.create_dataset("ids", data=self.ids, dtype=strings)
                f.create_dataset("labels", data=self.labels)
                f.create_dataset("class_names", data=np.array(self.class_names, dtype=object),
                                 dtype=strings)
                for key, value in scaler_to_arrays(self.scaler).items():
                    f.create_dataset(f"scaler/{key}", data=value)
                if self.images is not None:
                    f.create_dataset("images", data=self.images, compression="gzip")
                for name in ("paths", "categories"):
                    if getattr(self, name) is not None:
                        f.create_dataset(name, data=getattr(self, name), dtype=strings)
        return Path(path)

    @classmethod
    def load(cls, path):
        """Read an index written by :meth:`save`; a foreign or corrupt file is a
        :class:`FashionrecError`."""
        with _reading(path) as f:
            scaler = scaler_from_arrays({k: f["scaler"][k][()] for k in f["scaler"]})
            strings = {name: _as_strings(f[name][:]) if name in f else None
                       for name in ("paths", "categories")}
            return cls(
                f["vectors"][:], _read_ids(f), f["labels"][:], _as_strings(f["class_names"][:]),
                scaler, f["images"][:] if "images" in f else None,
                json.loads(f.attrs.get("metadata", "{}")), **strings,
            )

    @staticmethod
    def read_header(path):
        """``(ids, metadata, class_names, dim)`` of an index file, without its vectors."""
        with _reading(path) as f:
            return (_read_ids(f), json.loads(f.attrs.get("metadata", "{}")),
                    tuple(_as_strings(f["class_names"][:])), int(f["vectors"].shape[1]))


@contextlib.contextmanager
def _reading(path):
    """An index file opened for reading, its format checked; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise FashionrecError(f"index {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise FashionrecError(f"{path} is not a fashionrec index (foreign HDF5 file)")
            version = int(f.attrs.get("format_version", -1))
            if version not in READABLE_VERSIONS:
                raise FashionrecError(
                    f"{path} has index format {version}; this fashionrec reads "
                    f"{', '.join(map(str, READABLE_VERSIONS))}")
            yield f
    except FashionrecError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise FashionrecError(f"{path} is corrupt or not a fashionrec index ({exc})") from None


def _read_ids(f):
    ids = f["ids"][:]
    return _as_strings(ids) if f.attrs.get("id_kind", "int") == "str" else ids


def parse_id(item_id, kind):
    """``item_id`` as an id of ``kind`` (``"int"``: ``"17"`` -> ``17``; ``"str"``)."""
    if kind == "str":
        return str(item_id)
    try:
        return int(item_id)
    except (TypeError, ValueError):
        raise FashionrecError(f"this catalog's item ids are integers, not {item_id!r}") from None


def _as_strings(values):
    """A 1-D object array of Python ``str`` (HDF5 gives bytes)."""
    if isinstance(values, np.ndarray) and values.dtype == object and all(
            type(v) is str for v in values):
        return values
    out = np.empty(len(values), dtype=object)
    out[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return out


def _as_ids(ids):
    arr = np.asarray(ids)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if len(arr) and all(isinstance(i, (int, np.integer)) for i in arr.tolist()):
        return arr.astype(np.int64)
    return _as_strings(arr.tolist())


# ---------------------------------------------------------------- a living index
class IndexStore:
    """A catalog index on disk that grows and shrinks without being rewritten.

    ``path`` is the base index file (``RUN_DIR/index.h5``, written once at training).
    :meth:`add` writes the new items as one segment file under ``index.d/`` and then
    appends ``{"op": "add"}`` to ``index.manifest.json``; :meth:`remove` appends
    ``{"op": "remove", "ids": [...]}``. The manifest is replaced atomically (temp file,
    fsync, rename) only after every file it names is complete, so a reader — or a
    process killed at any instant — sees either the old or the new state, never a
    mix. Updates hold an exclusive lock file; segments left by a killed update are
    deleted by the next one. :meth:`load` replays the operations over the base.

    Example:
        >>> store = IndexStore("runs/demo/index.h5")              # doctest: +SKIP
        >>> store.remove(["Shoes/Boots/A/12.jpg"])                # doctest: +SKIP
        >>> len(store.load())                                     # doctest: +SKIP
    """

    def __init__(self, path):
        self.path = Path(path)
        self.manifest_path = self.path.with_suffix(".manifest.json")
        self.segment_dir = self.path.with_suffix(".d")
        self.lock_path = self.path.with_suffix(".lock")

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
                for op in ops)):
            raise FashionrecError(f"{self.manifest_path} is damaged; deleting it (and "
                                  f"{self.segment_dir}) returns the index to its trained state")
        return m

    def _replay(self, m, read):
        """Replay manifest ``m`` with ``read(path) -> (ids, metadata, part)``; return
        the base's metadata, the parts and ``{id: (part number, row)}`` of live items."""
        base_ids, base_meta, base = read(self.path.parent / m.get("base", self.path.name))
        run_id = base_meta.get("run_id")
        if m.get("run_id", run_id) != run_id:
            raise FashionrecError(f"{self.manifest_path} belongs to another run than "
                                  f"{self.path}; delete it (and {self.segment_dir}) or re-train")
        parts = [base]
        live = {i: (0, r) for r, i in enumerate(base_ids.tolist())}
        for op in m["ops"]:
            if op["op"] == "add":
                seg = self.path.parent / op["file"]
                if not seg.is_file():
                    raise FashionrecError(
                        f"index segment {seg} named in {self.manifest_path} is missing; the "
                        f"index is damaged (deleting the manifest returns it to its trained "
                        f"state)")
                ids, meta, part = read(seg)
                if meta.get("run_id") != run_id:
                    raise FashionrecError(f"index segment {seg} belongs to another run")
                live.update({i: (len(parts), r) for r, i in enumerate(ids.tolist())})
                parts.append(part)
            elif op["op"] == "remove":
                for i in op["ids"]:
                    live.pop(i, None)
        return base_meta, parts, live

    def load(self):
        """The live index: the base, plus added segments, minus removed items."""
        m = self.manifest()

        def read(path):
            index = CatalogIndex.load(path)
            return index.ids, index.metadata, index

        base_meta, parts, live = self._replay(m, read)
        base = parts[0]
        if len(parts) == 1 and len(live) == len(base):
            index = base
        else:
            rows = [[] for _ in parts]
            for p, r in live.values():
                rows[p].append(r)
            index = CatalogIndex.concat(parts, [sorted(r) for r in rows])
        index.metadata = {**base_meta, "generation": m["generation"],
                          "n_updates": len(m["ops"])}
        return index

    def live_ids(self, m=None):
        """``(live ids, base header)`` read from the ids alone (no vectors): what an
        update needs to check, at a cost that does not grow with the vectors."""
        m = self.manifest() if m is None else m

        def read(path):
            ids, meta, class_names, dim = CatalogIndex.read_header(path)
            return ids, meta, (ids, meta, class_names, dim)

        _, parts, live = self._replay(m, read)
        return set(live), parts[0]

    @contextlib.contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            yield
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FashionrecError(f"{self.path} is being updated by another process "
                                      f"(lock {self.lock_path})") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _publish(self, manifest):
        manifest = {**manifest, "generation": manifest["generation"] + 1, "updated": now_iso()}
        write_json(self.manifest_path, manifest)
        return manifest

    def _clean_orphans(self, manifest):
        """Delete segment files no manifest names (left by a killed update)."""
        named = {self.path.parent / op["file"] for op in manifest["ops"] if op["op"] == "add"}
        if self.segment_dir.is_dir():
            for f in self.segment_dir.iterdir():
                if f.is_file() and f not in named:
                    f.unlink(missing_ok=True)

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
            m.setdefault("run_id", run_id)
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
            m.setdefault("run_id", base_meta.get("run_id"))
            m["ops"] = [*m["ops"], {"op": "remove", "ids": list(dict.fromkeys(ids)),
                                    "at": now_iso()}]
            return self._publish(m)

    def reset(self):
        """Forget every update (used when a new base is written by training)."""
        self.manifest_path.unlink(missing_ok=True)
        if self.segment_dir.is_dir():
            for f in self.segment_dir.iterdir():
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.segment_dir.rmdir()
