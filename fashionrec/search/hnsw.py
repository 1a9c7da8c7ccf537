"""Approximate search: a FAISS HNSW graph (``pip install 'fashionrec[ann]'``).

The graph (``IndexHNSWFlat``) finds the rows; their distances are then measured in
float64 from the index's vectors, like the exact back-end's, so both report the same
distance for the same row. Filters keep their meaning:

* a selective filter (at most ``filter_exact_max`` allowed rows) is answered exactly
  over those rows;
* a broad one is first looked for among the query's unfiltered graph neighbours
  (``ef_search`` of them). Where its rows are there about as common as in the whole
  catalog (a random attribute; a category the query belongs to), the query goes
  through the graph with an ``IDSelectorBitmap`` and a search list widened by the
  share of rows the filter keeps (``ef_search / share``). Where they are rare (under
  ``FAR_RATIO`` of that share: a category queried from another category's product),
  the graph would walk the query's own neighbourhood and find none of them, so the
  allowed rows are scanned exactly;
* a query that finds fewer rows than it may get (a narrow filter in a big graph) is
  answered exactly, so no filter ever returns fewer items than exist.

An exact answer over allowed rows measures the graph's own flat vectors at just those
rows (FAISS with an ``IDSelectorArray``: nothing is copied), split over a few threads
when there are many; the best candidates are then re-measured like every answer.

Saved with ``faiss.write_index`` and read back memory-mapped, so loading does not
read the graph's vectors into memory.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..artifacts import atomic_path
from ..errors import FashionrecError
from .base import SearchBackend, check_query, n_candidates, order_by_distance
from .exact import MARGIN, ExactSearch, true_distances

EF_MAX = 4096  # the widest search list a filter may ask for
FILTER_EXACT_MAX = 20000  # filters keeping at most this many rows are answered exactly
# a broad filter whose rows are, near a query, rarer than this share of its overall
# share is "far" from that query: scanned exactly instead of walked through the graph
FAR_RATIO = 0.25
SCAN_THREADS = min(4, os.cpu_count() or 1)  # threads an exact scan of many rows uses
SCAN_PART_MIN = 25000  # allowed rows per thread at least


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
        queries = check_query(queries, self.index.d)
        n_allowed = self.size if allowed is None else len(allowed)
        k = int(min(k, n_candidates(self.size, allowed, exclude)))
        if k < 1:
            raise FashionrecError("the catalog has too few items for this query")
        exclude = None if exclude is None else np.asarray(exclude, dtype=np.int64)
        bits = None
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            if n_allowed <= self.filter_exact_max:
                return self._scan(queries, k, allowed, exclude)
            mask = np.zeros(self.size, dtype=bool)
            mask[allowed] = True
            bits = np.packbits(mask, bitorder="little")
            far = self._far(queries, mask, n_allowed)
            if far.all():
                return self._scan(queries, k, allowed, exclude)
            if far.any():  # some queries are far from the filter's rows, some are not
                rows = np.empty((len(queries), k), dtype=np.int64)
                dists = np.empty((len(queries), k))
                ex = None if exclude is None else exclude[far]
                rows[far], dists[far] = self._scan(queries[far], k, allowed, ex)
                ex = None if exclude is None else exclude[~far]
                rows[~far], dists[~far] = self._graph(queries[~far], k, bits, allowed, ex)
                return rows, dists
        return self._graph(queries, k, bits, allowed, exclude)

    def _far(self, queries, mask, n_allowed):
        """Which queries the filter ``mask`` keeps few rows near: among each query's
        ``ef_search`` unfiltered graph neighbours, allowed rows are fewer than
        ``FAR_RATIO`` times the filter's share of the catalog. The graph walks the
        query's neighbourhood, so it cannot find such a filter's rows (a category
        queried from another category's product); they are scanned instead."""
        params = faiss_params(self.ef_search)
        _, near = self.index.search(queries, self.ef_search, params=params)
        near_share = np.where(near >= 0, mask[np.maximum(near, 0)], False).mean(axis=1)
        return near_share < FAR_RATIO * n_allowed / self.size

    def _graph(self, queries, k, bits, allowed, exclude):
        """Through the graph (with the filter's bitmap as its selector and the search
        list widened by the share of rows the filter keeps)."""
        faiss = _faiss()
        kk = k + (exclude is not None)
        ef = max(self.ef_search, kk)
        selector = None  # a local: FAISS does not keep it alive itself
        params = faiss.SearchParametersHNSW()
        if bits is not None:
            params.sel = selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits))
            ef = min(EF_MAX, max(ef, math.ceil(ef * self.size / max(len(allowed), 1))))
        params.efSearch = ef
        _, rows = self.index.search(queries, kk, params=params)
        del selector
        rows = rows.astype(np.int64)
        if exclude is not None:
            rows[rows == exclude[:, None]] = -1
        # the rows the graph found, measured exactly (as the exact back-end does)
        rows, dists = order_by_distance(rows, true_distances(queries, self.exact.vectors, rows),
                                        k)
        short = np.flatnonzero((rows < 0).any(axis=1))
        if len(short):  # the graph found too few: answer those queries exactly
            ex = None if exclude is None else exclude[short]
            rows[short], dists[short] = (
                self.exact.search(queries[short], k, None, ex) if allowed is None else
                self._scan(queries[short], k, allowed, ex))
        return rows, dists

    def _scan(self, queries, k, allowed, exclude):
        """Exactly, over the allowed rows: the graph's own flat vectors measured at
        those rows alone (FAISS, with an ``IDSelectorArray``; nothing is copied), on
        up to ``SCAN_THREADS`` threads, each a part of the rows; the best
        ``k + MARGIN`` re-measured in float64 and ordered like the exact back-end's."""
        kk = min(len(allowed), k + MARGIN + (exclude is not None))
        parts = np.array_split(allowed, max(1, min(SCAN_THREADS, len(allowed) // SCAN_PART_MIN)))
        if len(parts) == 1:
            rows = _rows_at(self._flat(), queries, kk, allowed)
        else:
            rows = np.concatenate(list(_pool().map(
                lambda part: _rows_at(self._flat(), queries, kk, part), parts)), axis=1)
        if exclude is not None:
            rows[rows == exclude[:, None]] = -1
        return order_by_distance(rows, true_distances(queries, self.exact.vectors, rows), k)

    def _flat(self):
        """The graph's flat storage (its vectors, as an exact FAISS index)."""
        return _faiss().downcast_index(self.index.storage)


def _rows_at(flat, queries, k, rows):
    """The ``k`` nearest of ``rows`` (sorted, int64) in the FAISS flat index ``flat``
    for each query (``-1`` padding where there are fewer)."""
    faiss = _faiss()
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    params = faiss.SearchParameters()
    params.sel = selector = faiss.IDSelectorArray(len(rows), faiss.swig_ptr(rows))
    _, found = flat.search(queries, min(k, len(rows)), params=params)
    del selector
    return np.pad(found.astype(np.int64), ((0, 0), (0, k - found.shape[1])),
                  constant_values=-1)


_POOL = []


def _pool():
    """The threads a scan's parts run on (FAISS releases the GIL while it searches)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="hnsw-scan"))
    return _POOL[0]


def faiss_params(ef):
    params = _faiss().SearchParametersHNSW()
    params.efSearch = int(ef)
    return params
