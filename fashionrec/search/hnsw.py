"""Approximate search: a FAISS HNSW graph (``pip install 'fashionrec[ann]'``).

The graph (``IndexHNSWFlat``) finds the rows; their distances are then measured in
float64 from the index's vectors, like the exact back-end's, so both report the same
distance for the same row. Filters keep their meaning:

* a selective filter (at most ``filter_exact_max`` allowed rows) is answered exactly
  over those rows;
* a broad one goes through the graph with an ``IDSelectorBitmap`` and a search list
  widened by the share of rows the filter keeps (``ef_search / share``);
* a query that finds fewer rows than it may get (a narrow filter in a big graph) is
  answered exactly, so no filter ever returns fewer items than exist.

Saved with ``faiss.write_index`` and read back memory-mapped, so loading does not
read the graph's vectors into memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..artifacts import atomic_path
from ..errors import FashionrecError
from .base import SearchBackend, check_query, n_candidates, order_by_distance
from .exact import ExactSearch, true_distances

EF_MAX = 4096  # the widest search list a filter may ask for
FILTER_EXACT_MAX = 20000  # filters keeping at most this many rows are answered exactly


def _faiss():
    try:
        import faiss
    except ImportError:
        raise FashionrecError("HNSW search needs faiss: pip install 'fashionrec[ann]'") from None
    return faiss


class HNSWSearch(SearchBackend):
    """A FAISS HNSW graph over ``vectors``.

    Args:
        index: a ``faiss.IndexHNSWFlat``.
        vectors: the ``(N, D)`` rows it was built from (an array or memory map), for
            exact answers to selective filters.
        m, ef_construction: the graph's parameters (as built).
        ef_search: the search list of an unfiltered query (at least ``k``).
        filter_exact_max: filters keeping at most this many rows are answered exactly.
    """

    name = "hnsw"

    def __init__(self, index, vectors, m, ef_construction, ef_search,
                 filter_exact_max=FILTER_EXACT_MAX):
        if index.ntotal != len(vectors) or index.d != vectors.shape[1]:
            raise FashionrecError(f"the HNSW graph holds {index.ntotal} x {index.d} vectors, "
                                  f"the index {len(vectors)} x {vectors.shape[1]}")
        self.index = index
        self.exact = ExactSearch(vectors)
        self.m, self.ef_construction = int(m), int(ef_construction)
        self.ef_search, self.filter_exact_max = int(ef_search), int(filter_exact_max)

    @property
    def size(self):
        return int(self.index.ntotal)

    def params(self):
        return {"backend": self.name, "m": self.m, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search, "filter_exact_max": self.filter_exact_max}

    @classmethod
    def build(cls, vectors, m, ef_construction, ef_search, filter_exact_max=FILTER_EXACT_MAX,
              progress=False, chunk=50000):
        """Build the graph (adding ``chunk`` rows at a time, with a progress bar)."""
        from tqdm.auto import tqdm

        faiss = _faiss()
        index = faiss.IndexHNSWFlat(int(vectors.shape[1]), int(m))
        index.hnsw.efConstruction = int(ef_construction)
        with tqdm(total=len(vectors), desc="hnsw graph", unit="item", disable=not progress,
                  leave=False) as bar:
            for s in range(0, len(vectors), chunk):
                block = np.ascontiguousarray(vectors[s:s + chunk], dtype=np.float32)
                index.add(block)
                bar.update(len(block))
        return cls(index, vectors, m, ef_construction, ef_search, filter_exact_max)

    def save(self, path):
        """Write the graph to ``path`` atomically (FAISS's own format); returns its
        record (parameters, size, FAISS version) for the store's manifest."""
        faiss = _faiss()
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return {**self.params(), "n": self.size, "dim": int(self.index.d),
                "bytes": Path(path).stat().st_size, "faiss": faiss.__version__}

    def check(self, vectors, n=16):
        """A loaded graph must hold ``vectors`` at a few rows spread over it (a cheap
        guard against a file that reads but belongs to other vectors)."""
        rows = np.linspace(0, len(vectors) - 1, min(n, len(vectors))).astype(np.int64)
        stored = np.stack([self.index.reconstruct(int(r)) for r in rows])
        if not np.array_equal(stored, np.asarray(vectors[rows], dtype=np.float32)):
            raise FashionrecError("its vectors are not the index's")
        return self

    @classmethod
    def load(cls, path, vectors, **params):
        """Read a graph written by :meth:`save`, memory-mapped; a damaged file is a
        :class:`FashionrecError`."""
        faiss = _faiss()
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise FashionrecError(f"{path} is not a readable HNSW graph "
                                  f"({str(exc).splitlines()[0][:200]})") from None
        if not isinstance(index, faiss.IndexHNSWFlat):
            raise FashionrecError(f"{path} is a {type(index).__name__}, not an HNSW graph")
        return cls(index, vectors, **params)

    def search(self, queries, k, allowed=None, exclude=None):
        faiss = _faiss()
        queries = check_query(queries, self.index.d)
        n_allowed = self.size if allowed is None else len(allowed)
        k = int(min(k, n_candidates(self.size, allowed, exclude)))
        if k < 1:
            raise FashionrecError("the catalog has too few items for this query")
        if allowed is not None and n_allowed <= self.filter_exact_max:
            return self.exact.search(queries, k, allowed, exclude)
        kk = k + (exclude is not None)
        params = faiss.SearchParametersHNSW()
        ef = max(self.ef_search, kk)
        bits = selector = None  # locals: FAISS does not keep them alive itself
        if allowed is not None:
            mask = np.zeros(self.size, dtype=bool)
            mask[np.asarray(allowed, dtype=np.int64)] = True
            bits = np.packbits(mask, bitorder="little")
            params.sel = selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits))
            ef = min(EF_MAX, max(ef, math.ceil(ef * self.size / max(n_allowed, 1))))
        params.efSearch = ef
        _, rows = self.index.search(queries, kk, params=params)
        del bits, selector
        rows = rows.astype(np.int64)
        if exclude is not None:
            rows[rows == np.asarray(exclude, dtype=np.int64)[:, None]] = -1
        # the rows the graph found, measured exactly (as the exact back-end does)
        rows, dists = order_by_distance(rows, true_distances(queries, self.exact.vectors, rows),
                                        k)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if len(short):  # the graph found too few: answer those queries exactly
            ex = None if exclude is None else np.asarray(exclude)[short]
            rows[short], dists[short] = self.exact.search(queries[short], k, allowed, ex)
        return rows, dists
