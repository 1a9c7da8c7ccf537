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

from ..config import SEARCH_CHOICES as CHOICES
from ..config import RunConfig
from ..errors import FashionrecError
from .base import LiveSearch, SearchBackend
from .exact import ExactSearch, knn_search
from .hnsw import FILTER_EXACT_MAX

_F = RunConfig.__dataclass_fields__
HNSW_DEFAULTS = {"m": _F["hnsw_m"].default, "ef_construction": _F["hnsw_ef_construction"].default,
                 "ef_search": _F["hnsw_ef_search"].default, "filter_exact_max": FILTER_EXACT_MAX}


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

        return HNSWSearch.build(vectors, **{k: v for k, v in spec.items() if k != "backend"},
                                progress=progress)
    raise FashionrecError(f"unknown search back-end {spec['backend']!r}")


__all__ = ["CHOICES", "ExactSearch", "LiveSearch", "SearchBackend", "build", "knn_search",
           "resolve"]
