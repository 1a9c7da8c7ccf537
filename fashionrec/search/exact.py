"""Exact search: ``‖x‖² − 2 q·x + ‖q‖²`` on BLAS, in blocks, then the few best
candidates re-measured in float64.

The catalog is never converted as a whole: each block of rows is used in its own
dtype (float32 for an index), multiplied with the queries in one matrix product and
reduced to its best candidates. A filter's rows are gathered the same way, a block
at a time into one reused buffer, never copied out all at once. The ``k + margin``
best candidates of each query are then measured exactly (float64 differences), so the distances are true Euclidean
distances and equal distances are listed by row, as a full ``cdist`` would give.
"""

from __future__ import annotations

import numpy as np

from ..errors import FashionrecError
from .base import SearchBackend, check_query, n_candidates, order_by_distance

BLOCK_ELEMENTS = 1 << 23  # queries x rows compared at a time (32 MB of float32)
MARGIN = 16  # candidates re-measured beyond k, against float32 rounding
GATHER_ROWS = 4096  # allowed rows of a filter gathered at a time (8 MB of 512-d float32)


class ExactSearch(SearchBackend):
    """Exact nearest rows of ``vectors`` (``(N, D)``, an array or a memory map).

    Args:
        vectors: the rows searched, kept as given (not copied) when float32 or
            float64; anything else is converted to float32.
        block_rows: rows per block (default: as many as keep a block of distances
            at about 32 MB).
        query_block: queries handled together.

    Example:
        >>> import numpy as np
        >>> s = ExactSearch(np.array([[0.0], [1.0], [3.0]], dtype=np.float32))
        >>> rows, dists = s.search([[2.0]], k=2)
        >>> rows.tolist(), dists.tolist()
        ([[1, 2]], [[1.0, 1.0]])
    """

    name = "exact"

    def __init__(self, vectors, block_rows=None, query_block=256):
        if not (hasattr(vectors, "dtype") and vectors.dtype in (np.float32, np.float64)):
            vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise FashionrecError(f"search vectors must be (N, D), got shape {vectors.shape}")
        self.vectors = vectors
        self.block_rows = block_rows
        self.query_block = query_block
        self._sqnorms = None

    @property
    def size(self):
        return self.vectors.shape[0]

    @property
    def dim(self):
        return self.vectors.shape[1]

    def sqnorms(self):
        """Squared norms of every row (computed once, in blocks)."""
        if self._sqnorms is None:
            out = np.empty(self.size, dtype=self.vectors.dtype)
            for s in range(0, self.size, 65536):
                block = np.asarray(self.vectors[s:s + 65536])
                out[s:s + len(block)] = np.einsum("ij,ij->i", block, block)
            self._sqnorms = out
        return self._sqnorms

    def search(self, queries, k, allowed=None, exclude=None):
        queries = check_query(queries, self.dim)
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64)
        if allowed is not None:  # a filter: exclusions as positions among its rows
            allowed = np.asarray(allowed, dtype=np.int64)
            if exclude is not None:
                exclude = positions_in(allowed, exclude)
        n = self.size if allowed is None else len(allowed)
        k = int(min(k, n_candidates(n, None, exclude)))
        if k < 1:
            raise FashionrecError("the catalog has too few items for this query")
        m = len(queries)
        rows = np.empty((m, k), dtype=np.int64)
        dists = np.empty((m, k))
        for q0 in range(0, m, self.query_block):
            q = queries[q0:q0 + self.query_block]
            ex = None if exclude is None else exclude[q0:q0 + self.query_block]
            cand = self._candidates(q.astype(self.vectors.dtype, copy=False),
                                    min(n, k + MARGIN), ex, allowed)
            if allowed is not None:  # positions among the allowed rows -> rows
                cand = allowed[cand]
                if ex is not None:
                    ex = np.where(ex >= 0, allowed[np.maximum(ex, 0)], -1)
            d = true_distances(q, self.vectors, cand)
            if ex is not None:
                d[cand == ex[:, None]] = np.inf
            r, dd = order_by_distance(cand, d, k)
            rows[q0:q0 + len(q)], dists[q0:q0 + len(q)] = r, dd
        return rows, dists

    def _block(self, start, stop, allowed, buf):
        """Rows ``start:stop`` (of the catalog, or of ``allowed``) and their squared
        norms; allowed rows are gathered into ``buf`` (one block at a time, never the
        whole filter at once)."""
        if allowed is None:
            return np.asarray(self.vectors[start:stop]), self.sqnorms()[start:stop]
        rows = allowed[start:stop]
        x = np.take(self.vectors, rows, axis=0, out=buf[:len(rows)])
        norms = self._sqnorms[rows] if self._sqnorms is not None else np.einsum(
            "ij,ij->i", x, x)
        return x, norms

    def _candidates(self, q, kk, exclude, allowed=None):
        """The ``kk`` positions (rows, or indices into ``allowed``) of smallest
        ``‖x‖² − 2 q·x`` for each query."""
        n, m = (self.size if allowed is None else len(allowed)), len(q)
        block = self.block_rows or max(1024, BLOCK_ELEMENTS // max(m, 1))
        buf = None
        if allowed is not None:
            block = min(block, GATHER_ROWS)
            buf = np.empty((min(block, n), self.dim), dtype=self.vectors.dtype)
        best_d = np.empty((m, 0), dtype=q.dtype)
        best_i = np.empty((m, 0), dtype=np.int64)
        for s in range(0, n, block):
            x, norms = self._block(s, s + block, allowed, buf)
            d = q @ x.T
            d *= -2
            d += norms
            if exclude is not None:
                local = exclude - s
                hit = (local >= 0) & (local < len(x))
                d[np.flatnonzero(hit), local[hit]] = np.inf
            idx = np.broadcast_to(np.arange(s, s + len(x)), d.shape)
            if len(x) > kk:
                part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
                d, idx = np.take_along_axis(d, part, axis=1), part + s
            best_d = np.concatenate([best_d, d], axis=1)
            best_i = np.concatenate([best_i, idx], axis=1)
            if best_d.shape[1] > kk:
                part = np.argpartition(best_d, kk - 1, axis=1)[:, :kk]
                best_d = np.take_along_axis(best_d, part, axis=1)
                best_i = np.take_along_axis(best_i, part, axis=1)
        return best_i


def positions_in(allowed, rows):
    """The position of each of ``rows`` in the sorted ``allowed`` (``-1`` where a row
    is ``-1`` or not allowed)."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(allowed):
        return np.full(rows.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(allowed, rows), len(allowed) - 1)
    return np.where((rows >= 0) & (allowed[pos] == rows), pos, -1)


def true_distances(queries, vectors, rows):
    """Euclidean distances in float64 between each query and its ``rows`` of
    ``vectors`` (``(M, K)``; a row of ``-1`` gets ``inf``)."""
    valid = rows >= 0
    x = np.asarray(vectors[np.where(valid, rows, 0).ravel()], dtype=np.float64)
    diff = x.reshape(*rows.shape, -1) - np.asarray(queries, dtype=np.float64)[:, None, :]
    return np.where(valid, np.sqrt(np.einsum("ijk,ijk->ij", diff, diff)), np.inf)


def knn_search(queries, vectors, k, exclude=None, block_size=None, query_block=256):
    """Exact k nearest neighbours by Euclidean distance (:class:`ExactSearch`).

    Args:
        queries: ``(M, D)`` array.
        vectors: ``(N, D)`` array (or a memory map).
        k: neighbours per query (capped at the number of candidates).
        exclude: optional ``(M,)`` rows (``-1``: none) each query must not get back.
        block_size, query_block: catalog rows and queries compared at a time; memory
            is ``O(query_block * block_size)``, never ``O(M * N)``.

    Returns:
        ``(rows, distances)``, both ``(M, k)``, nearest first; equal distances are
        listed by row.
    """
    return ExactSearch(vectors, block_size, query_block).search(queries, k, exclude=exclude)
