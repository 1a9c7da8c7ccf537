"""The search contract every back-end keeps, and the merge of two back-ends."""

from __future__ import annotations

import abc

import numpy as np

from ..errors import FashionrecError


class SearchBackend(abc.ABC):
    """Nearest rows of a ``(N, D)`` float32 array by Euclidean distance.

    Every back-end answers :meth:`search` the same way, so the rest of the package
    does not know which one answered:

    * ``queries`` ``(M, D)``; ``k`` neighbours per query (capped at the candidates);
    * ``allowed``: ``None`` or a sorted 1-D array of rows, the only rows any query may
      get (a filter, e.g. one class);
    * ``exclude``: ``None`` or ``(M,)`` rows, one per query (``-1``: none), that query
      must not get back (the query itself when it is in the catalog);
    * returns ``(rows, distances)``, both ``(M, k)``, nearest first; distances are true
      Euclidean distances (not squared), and equal distances are listed by row.
    """

    name = "abstract"

    @property
    @abc.abstractmethod
    def size(self):
        """Rows searched."""

    @abc.abstractmethod
    def search(self, queries, k, allowed=None, exclude=None):
        """``(rows, distances)``; see the class doc."""

    def params(self):
        """The back-end's parameters, as recorded in a run."""
        return {"backend": self.name}


def check_query(queries, dim):
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise FashionrecError(f"queries must be (M, {dim}) vectors, got shape {queries.shape}")
    return queries


def n_candidates(n, allowed, exclude):
    """How many rows a query can get at most."""
    n = n if allowed is None else len(allowed)
    return n - (exclude is not None and bool(np.any(np.asarray(exclude) >= 0)))


def order_by_distance(rows, dists, k):
    """Sort each query's candidates by (distance, row) and keep ``k``; padded
    candidates (row -1, distance inf) sort last."""
    order = np.lexsort((rows, dists), axis=1)[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(dists, order, axis=1)


class LiveSearch(SearchBackend):
    """A living index searched as one: an ANN over its base (whose removed rows are
    never returned) and an exact search over the rows added since, merged.

    Rows are those of the live index: first the base's live rows in base order, then
    the added rows. ``base_rows[i]`` is the base row of live row ``i`` (for
    ``i < len(base_rows)``); ``tail`` searches the added rows (their own numbering).
    """

    name = "live"

    def __init__(self, ann, base_rows, tail):
        self.ann = ann
        self.base_rows = np.asarray(base_rows, dtype=np.int64)
        self.tail = tail
        self.n_base = len(self.base_rows)
        self._all_base = self.n_base == ann.size and bool(
            np.array_equal(self.base_rows, np.arange(ann.size)))

    @property
    def size(self):
        return self.n_base + (self.tail.size if self.tail is not None else 0)

    def params(self):
        return {**self.ann.params(), "live_rows": self.size, "exact_tail_rows":
                0 if self.tail is None else self.tail.size}

    def search(self, queries, k, allowed=None, exclude=None):
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        m = len(queries)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            a_base = self.base_rows[allowed[allowed < self.n_base]]
            a_tail = allowed[allowed >= self.n_base] - self.n_base
        else:
            a_base = None if self._all_base else self.base_rows
            a_tail = None
        ex_base = ex_tail = None
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64)
            in_base = (exclude >= 0) & (exclude < self.n_base)
            ex_base = np.where(in_base, self.base_rows[np.where(in_base, exclude, 0)], -1)
            ex_tail = np.where(exclude >= self.n_base, exclude - self.n_base, -1)
        parts = []
        if a_base is None or len(a_base):
            rows, dists = self.ann.search(queries, k, a_base, ex_base)
            live = np.searchsorted(self.base_rows, rows)  # base rows are sorted
            parts.append((np.where(rows >= 0, live, -1), dists))
        if self.tail is not None and self.tail.size and (a_tail is None or len(a_tail)):
            rows, dists = self.tail.search(queries, k, a_tail, ex_tail)
            parts.append((np.where(rows >= 0, rows + self.n_base, -1), dists))
        if not parts:
            return np.empty((m, 0), dtype=np.int64), np.empty((m, 0))
        rows = np.concatenate([p[0] for p in parts], axis=1)
        dists = np.concatenate([p[1] for p in parts], axis=1)
        k = min(k, rows.shape[1])
        return order_by_distance(rows, np.where(rows >= 0, dists, np.inf), k)
