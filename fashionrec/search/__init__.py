"""Search back-ends: nearest catalog rows by Euclidean distance, behind one contract.

* :class:`~fashionrec.search.base.SearchBackend` — the contract: built over a
  ``(N, D)`` float32 array, ``search(queries, k, allowed=, exclude=)`` gives rows and
  true Euclidean distances, nearest first, ties by row;
* :class:`~fashionrec.search.exact.ExactSearch` — exact, float32 BLAS in blocks;
* :class:`~fashionrec.search.hnsw.HNSWSearch` — approximate, a FAISS HNSW graph
  (``pip install 'fashionrec[ann]'``), saved beside the index and memory-mapped;
* :class:`~fashionrec.search.base.LiveSearch` — an ANN over the base of a living
  index merged with an exact search over the rows added since.

:func:`resolve` turns a run's setting (``auto``, ``exact``, ``hnsw``) into a spec,
the plain dict recorded in ``run.json``; :func:`build` makes a back-end from one.
"""

from __future__ import annotations

from ..errors import FashionrecError
from .base import LiveSearch, SearchBackend
from .exact import ExactSearch, knn_search
from .hnsw import FILTER_EXACT_MAX

CHOICES = ("auto", "exact", "hnsw")  # a run's search setting
HNSW_DEFAULTS = {"m": 32, "ef_construction": 80, "ef_search": 96,
                 "filter_exact_max": FILTER_EXACT_MAX}


def hnsw_available():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(choice, n_items, hnsw_min_items=50000, log=None, **hnsw_params):
    """The search spec a run uses: ``{"backend": "exact"}`` or ``{"backend": "hnsw",
    m, ef_construction, ef_search, filter_exact_max}``.

    ``auto`` picks HNSW from ``hnsw_min_items`` items up when FAISS is installed (and
    says so through ``log`` when it is not); ``hnsw`` without FAISS is an error.
    """
    if choice not in CHOICES:
        raise FashionrecError(f"search must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "auto":
        if n_items < hnsw_min_items:
            return {"backend": "exact"}
        if not hnsw_available():
            if log:
                log(f"NOTE: {n_items} items would be searched with HNSW, but faiss is not "
                    f"installed (pip install 'fashionrec[ann]'); searching exactly")
            return {"backend": "exact"}
        choice = "hnsw"
    if choice == "exact":
        return {"backend": "exact"}
    if not hnsw_available():
        raise FashionrecError("search 'hnsw' needs faiss: pip install 'fashionrec[ann]'")
    params = {**HNSW_DEFAULTS, **{k: v for k, v in hnsw_params.items() if v is not None}}
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FashionrecError(f"hnsw {name} must be a positive integer, got {value!r}")
    return {"backend": "hnsw", **params}


def build(spec, vectors, progress=False):
    """A back-end of ``spec`` over ``vectors`` (an ANN is built: minutes at 1M items)."""
    spec = spec or {"backend": "exact"}
    if spec["backend"] == "exact":
        return ExactSearch(vectors)
    if spec["backend"] == "hnsw":
        from .hnsw import HNSWSearch

        return HNSWSearch.build(vectors, **graph_params(spec), progress=progress)
    raise FashionrecError(f"unknown search back-end {spec['backend']!r}")


def graph_params(spec):
    """The parameters of an HNSW ``spec`` (without its ``backend``)."""
    return {k: spec[k] for k in ("m", "ef_construction", "ef_search", "filter_exact_max")
            if k in spec}


def load_graph(path, vectors, spec):
    """The saved graph of ``spec`` over ``vectors``, checked against them; a missing,
    damaged or foreign file is a :class:`FashionrecError`."""
    from .hnsw import HNSWSearch

    return HNSWSearch.load(path, vectors, **graph_params(spec)).check(vectors)


__all__ = ["CHOICES", "ExactSearch", "LiveSearch", "SearchBackend", "build", "graph_params", "knn_search", "load_graph",
           "resolve"]
