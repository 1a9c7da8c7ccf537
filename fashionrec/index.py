"""Stage 4 — index: the catalog's embeddings, re-standardized, in one HDF5 file,
ranked by exact Euclidean distance.

Layout of ``index.h5`` (no pickle; every array is a plain HDF5 dataset):

* attrs ``format = "fashionrec-index"``, ``format_version``, ``metadata`` (JSON)
* ``vectors`` (N, D) float32 — standardized embeddings
* ``ids`` (N,) int64 — each item's index in the test split
* ``labels`` (N,) int64 and ``class_names`` (C,) strings
* ``scaler/mean``, ``scaler/scale``, ``scaler/var``, ``scaler/n_samples_seen``
* ``images`` (N, H, W) uint8 — the catalog images, for showing results
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial.distance import cdist
from sklearn.preprocessing import StandardScaler

from .artifacts import atomic_path, scaler_from_arrays, scaler_to_arrays
from .errors import FashionrecError

FORMAT = "fashionrec-index"
FORMAT_VERSION = 1


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
    """

    def __init__(self, vectors, ids, labels, class_names, scaler, images=None, metadata=None):
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.scaler = scaler
        self.images = None if images is None else np.asarray(images, dtype=np.uint8)
        self.metadata = dict(metadata or {})
        n = len(self.vectors)
        if len(self.ids) != n or len(self.labels) != n or (
                self.images is not None and len(self.images) != n):
            raise FashionrecError("index arrays disagree in length")
        self._row_of = {int(i): r for r, i in enumerate(self.ids)}

    @classmethod
    def build(cls, embeddings, ids, labels, class_names, images=None, metadata=None):
        scaler = StandardScaler().fit(np.asarray(embeddings, dtype=np.float64))
        vectors = scaler.transform(np.asarray(embeddings, dtype=np.float64))
        return cls(vectors, ids, labels, class_names, scaler, images, metadata)

    def __len__(self):
        return len(self.ids)

    @property
    def dim(self):
        return self.vectors.shape[1]

    def row_of(self, item_id):
        """Row of catalog item ``item_id`` or ``None``."""
        return self._row_of.get(int(item_id))

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

    def search_rows(self, vectors, k=6, exclude_rows=None):
        """Like :meth:`search`, excluding catalog rows (``-1``: none) instead of ids."""
        return knn_search(vectors, self.vectors, k, exclude_rows)

    def save(self, path):
        """Write the index to ``path`` atomically."""
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["metadata"] = json.dumps(self.metadata)
                f.create_dataset("vectors", data=self.vectors)
                f.create_dataset("ids", data=self.ids)
                f.create_dataset("labels", data=self.labels)
                f.create_dataset("class_names", data=np.array(self.class_names, dtype=object),
                                 dtype=h5py.string_dtype())
                for key, value in scaler_to_arrays(self.scaler).items():
                    f.create_dataset(f"scaler/{key}", data=value)
                if self.images is not None:
                    f.create_dataset("images", data=self.images, compression="gzip")
        return Path(path)

    @classmethod
    def load(cls, path):
        """Read an index written by :meth:`save`; a foreign or corrupt file is a
        :class:`FashionrecError`."""
        path = Path(path)
        if not path.is_file():
            raise FashionrecError(f"index {path} does not exist")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise FashionrecError(f"{path} is not a fashionrec index (foreign HDF5 file)")
                version = int(f.attrs.get("format_version", -1))
                if version != FORMAT_VERSION:
                    raise FashionrecError(
                        f"{path} has index format {version}; this fashionrec reads {FORMAT_VERSION}")
                scaler = scaler_from_arrays({k: f["scaler"][k][()] for k in f["scaler"]})
                return cls(
                    f["vectors"][:], f["ids"][:], f["labels"][:],
                    [s.decode() if isinstance(s, bytes) else s for s in f["class_names"][:]],
                    scaler,
                    f["images"][:] if "images" in f else None,
                    json.loads(f.attrs.get("metadata", "{}")),
                )
        except FashionrecError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise FashionrecError(f"{path} is corrupt or not a fashionrec index ({exc})") from None
