"""Stage 4 — index: the catalog's embeddings, re-standardized, in one HDF5 file,
ranked by Euclidean distance (exact, or a FAISS HNSW graph for large catalogs).

Layout of ``index.h5`` (no pickle; every array is a plain HDF5 dataset):

* attrs ``format = "fashionrec-index"``, ``format_version``, ``metadata`` (JSON),
  ``id_kind`` (``"int"`` or ``"str"``), ``base_id`` (this file's own id)
* ``vectors`` (N, D) float32 — standardized embeddings
* ``ids`` (N,) int64 or strings — a test-split index, or a product id
* ``labels`` (N,) int64 and ``class_names`` (C,) strings
* ``scaler/...`` — only in files of format 3 and older (the embedding scaler, now
  kept by the model)
* optional, for showing and filtering results: ``images`` (N, H, W) uint8 (the
  Fashion-MNIST catalog images), ``paths`` (N,) strings (a product's image file),
  ``categories`` (N,) strings (``/``-joined category path)
* optional: group ``attributes`` (attr ``schema``, JSON ``{name: type}``) with one
  (N,) dataset per product attribute (:mod:`fashionrec.attributes`)

:class:`~fashionrec.store.IndexStore` makes such a file a *living* index (added
segments, removed items, compaction, the saved HNSW graph); the search itself is a
:mod:`fashionrec.search` back-end.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import h5py
import numpy as np

from . import attributes as attrs
from . import expansion
from .artifacts import atomic_path, scaler_from_arrays, scaler_to_arrays
from .errors import FashionrecError
from .search import ExactSearch, knn_search  # noqa: F401 - knn_search: public here too

FORMAT = "fashionrec-index"
FORMAT_VERSION = 4  # 4: no scaler (the model keeps it)
READABLE_VERSIONS = (1, 2, 3, 4)


class CatalogIndex:
    """The recommendation catalog: standardized embeddings plus what to show.

    Its vectors come standardized from the model
    (:meth:`fashionrec.embedder.Embedder.encode_features`); query it with :meth:`search` / :meth:`search_rows`, persist it with
    :meth:`save` / :meth:`load`. Queries go to :attr:`backend`, a
    :class:`~fashionrec.search.SearchBackend` (exact unless another one is attached,
    e.g. the HNSW graph a living index loads).

    Args:
        vectors: ``(N, D)`` standardized embeddings.
        ids: ``(N,)`` unique item ids, all integers or all strings.
        labels: ``(N,)`` class numbers into ``class_names``.
        scaler: only in index files written before the model kept its own embedding
            scaler (:class:`~fashionrec.embedder.Embedder`); kept when such a file is
            compacted (a legacy run's model needs it).
        images, paths, categories: optional per-item arrays (see the module doc).
        metadata: a JSON-able dict saved with the index.
        attributes, schema: the products' attribute columns (``{name: (N,) array}``,
            typed as :func:`fashionrec.attributes.columns` makes them) and their
            ``{name: type}``; an attribute of ``schema`` not in ``attributes`` is
            missing for every item.
    """

    def __init__(self, vectors, ids, labels, class_names, scaler=None, images=None,
                 metadata=None, paths=None, categories=None, attributes=None, schema=None):
        self.vectors = np.asanyarray(vectors, dtype=np.float32)  # a memory map stays one
        self.ids = _as_ids(ids)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.scaler = scaler
        self.images = None if images is None else np.asarray(images, dtype=np.uint8)
        self.paths = None if paths is None else _as_strings(paths)
        self.categories = None if categories is None else _as_strings(categories)
        self.metadata = dict(metadata or {})
        n = len(self.vectors)
        self.schema = attrs.check_schema(dict(schema or {}))
        self.attributes = {name: (np.asarray(attributes[name], dtype=object)
                                  if kind == "string" else
                                  np.asarray(attributes[name], dtype=np.float64))
                           if attributes and name in attributes else attrs.empty(kind, n)
                           for name, kind in self.schema.items()}
        if any(a is not None and len(a) != n for a in (
                self.ids, self.labels, self.images, self.paths, self.categories,
                *self.attributes.values())):
            raise FashionrecError("index arrays disagree in length")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise FashionrecError("index labels out of range of its class names")
        self._row_of = dict(zip(self.ids.tolist(), range(n), strict=True))  # int or str keys
        if len(self._row_of) != n:
            raise FashionrecError("index ids are not unique")
        self._backend = None
        self.base_id = None  # the id of the file it was loaded from (see save)
        # alpha query expansion on every search ({"k", "alpha"}; the run's search spec)
        self.query_expansion = None

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

    def search(self, vectors, k=6, exclude_ids=None):
        """``(rows, distances)`` of the ``k`` catalog items nearest to each
        standardized query vector; ``exclude_ids`` (one per query, or ``None``)
        are never returned."""
        exclude = None
        if exclude_ids is not None:
            exclude = np.array([-1 if (r := self.row_of(i)) is None else r
                                for i in np.atleast_1d(exclude_ids)], dtype=np.int64)
        return self.search_rows(vectors, k, exclude)

    @property
    def backend(self):
        """The search back-end answering this index's queries (exact by default)."""
        if self._backend is None:
            self._backend = ExactSearch(self.vectors)
        return self._backend

    @backend.setter
    def backend(self, backend):
        if backend is not None and backend.size != len(self):
            raise FashionrecError(f"a search back-end over {backend.size} rows cannot serve "
                                  f"an index of {len(self)}")
        self._backend = backend

    def search_rows(self, vectors, k=6, exclude_rows=None, allowed_rows=None):
        """Like :meth:`search`, excluding catalog rows (``-1``: none) instead of ids;
        ``allowed_rows`` restricts the search to those rows (e.g. one category)."""
        if allowed_rows is not None:
            allowed_rows = np.asarray(allowed_rows, dtype=np.int64)
            if len(allowed_rows) > 1 and not (allowed_rows[1:] > allowed_rows[:-1]).all():
                allowed_rows = np.unique(allowed_rows)  # back-ends take sorted rows
        if self.query_expansion:  # the neighbours that expand a query ignore the filters
            vectors = expansion.expand(vectors, self.vectors, self.backend,
                                       self.query_expansion, exclude_rows)
        return self.backend.search(vectors, k, allowed_rows, exclude_rows)

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
                    if len(r) and (r.min() < 0 or r.max() >= len(a)):
                        raise FashionrecError(f"index rows {r.min()}..{r.max()} are out of "
                                              f"range of a part of {len(a)} items")
                    np.take(a, r, axis=0, out=out[start:start + len(r)])
                start += len(r)
            return out

        columns = attrs.gather([(p.schema, p.attributes) for p in parts], first.schema,
                               rows, sum(map(len, rows)))
        out = cls(gather("vectors"), gather("ids"), gather("labels"), first.class_names,
                  first.scaler, gather("images"), first.metadata,
                  gather("paths", ""), gather("categories", ""), columns, first.schema)
        out.query_expansion = first.query_expansion
        return out

    def save(self, path, base_id=None):
        """Write the index to ``path`` atomically; ``base_id`` (default: a new one)
        names this very file, so a living index can tell one base from another."""
        strings = h5py.string_dtype()
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["metadata"] = json.dumps(self.metadata)
                f.attrs["id_kind"] = self.id_kind
                f.attrs["base_id"] = base_id or uuid.uuid4().hex
                # contiguous and uncompressed, so that load() can memory-map it
                f.create_dataset("vectors", data=self.vectors)
                if self.id_kind == "int":
                    f.create_dataset("ids", data=self.ids)
                else:
                    f.create_dataset("ids", data=self.ids, dtype=strings)
                if self.scaler is not None:  # a legacy run's embedding scaler lives here
                    for key, value in scaler_to_arrays(self.scaler).items():
                        f.create_dataset(f"scaler/{key}", data=value)
                f.create_dataset("labels", data=self.labels)
                f.create_dataset("class_names", data=np.array(self.class_names, dtype=object),
                                 dtype=strings)
                if self.images is not None:
                    f.create_dataset("images", data=self.images, compression="gzip")
                for name in ("paths", "categories"):
                    if getattr(self, name) is not None:
                        f.create_dataset(name, data=getattr(self, name), dtype=strings)
                attrs.save(f, self.schema, self.attributes)
        return Path(path)

    @classmethod
    def load(cls, path, mmap=True):
        """Read an index written by :meth:`save`; a foreign or corrupt file is a
        :class:`FashionrecError`. The vectors are memory-mapped from the file when it
        allows (``mmap``), so loading reads only the ids and labels."""
        with _reading(path) as f:
            fh = f.fh  # the very file read, mapped below (never reopened by name)
            scaler = (scaler_from_arrays({k: f["scaler"][k][()] for k in f["scaler"]})
                      if "scaler" in f else None)
            strings = {name: _as_strings(f[name]) if name in f else None
                       for name in ("paths", "categories")}
            schema, columns = attrs.load(f)
            index = cls(
                _vectors(fh, f["vectors"], mmap), _read_ids(f), f["labels"][:],
                _as_strings(f["class_names"]), scaler,
                f["images"][:] if "images" in f else None,
                json.loads(f.attrs.get("metadata", "{}")), **strings, attributes=columns,
                schema=schema,
            )
            index.base_id = base_id_of(f)
            return index

    @staticmethod
    def read_header(path):
        """``(ids, metadata, class_names, dim, base_id)`` of an index file, without its
        vectors."""
        with _reading(path) as f:
            return (_read_ids(f), json.loads(f.attrs.get("metadata", "{}")),
                    tuple(_as_strings(f["class_names"])), int(f["vectors"].shape[1]),
                    base_id_of(f))


def base_id_of(f):
    """The id of an open index file (older files: their run id)."""
    if "base_id" in f.attrs:
        return str(f.attrs["base_id"])
    return json.loads(f.attrs.get("metadata", "{}")).get("run_id")


def _vectors(fh, dataset, mmap):
    """The vectors of an open index file: a read-only memory map of the open file
    ``fh`` where the dataset is stored contiguously, else read into memory. Mapping
    the open file, not its name, means a compaction that replaces the file meanwhile
    cannot pair these ids with another file's vectors."""
    offset = dataset.id.get_offset() if mmap and dataset.chunks is None else None
    if offset is None or dataset.dtype != np.float32 or dataset.compression is not None:
        return dataset[:]
    if dataset.size == 0:
        return np.empty(dataset.shape, dtype=np.float32)
    return np.memmap(fh, dtype=np.float32, mode="r", offset=offset, shape=dataset.shape)


@contextlib.contextmanager
def _reading(path):
    """An index file opened for reading, its format checked; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise FashionrecError(f"index {path} does not exist")
    try:
        with open(path, "rb") as fh, h5py.File(fh, "r") as f:
            f.fh = fh
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
    return _as_strings(f["ids"]) if f.attrs.get("id_kind", "int") == "str" else f["ids"][:]


def parse_id(item_id, kind):
    """``item_id`` as an id of ``kind`` (``"int"``: ``"17"`` -> ``17``; ``"str"``)."""
    if kind == "str":
        return str(item_id)
    try:
        return int(item_id)
    except (TypeError, ValueError):
        raise FashionrecError(f"this catalog's item ids are integers, not {item_id!r}") from None


def _as_strings(values):
    """A 1-D object array of Python ``str`` (an HDF5 string dataset is decoded by
    h5py, in one call)."""
    if isinstance(values, h5py.Dataset):
        return values.asstr()[:] if len(values) else np.empty(0, dtype=object)
    if isinstance(values, np.ndarray) and values.dtype == object and all(
            type(v) is str for v in values):
        return values
    out = np.empty(len(values), dtype=object)
    out[:] = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return out


def _as_ids(ids):
    arr = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if len(arr) and all(isinstance(i, (int, np.integer)) for i in arr.tolist()):
        return arr.astype(np.int64)
    return _as_strings(arr if arr.dtype == object else arr.tolist())
