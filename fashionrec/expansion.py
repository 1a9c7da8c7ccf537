"""Query expansion (alpha-QE) and database-side augmentation (DBA), as in image retrieval
(Radenović, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018; Gordo et al., "End-to-end learning of deep visual representations for image
retrieval", IJCV 2017).

Both replace a vector by a weighted mean of itself and its ``k`` nearest catalog
vectors, each neighbour weighted by its cosine similarity to the vector (clipped at 0)
raised to ``alpha``; the vector itself has weight 1. The mean stays in the catalog's
(standardized) space, so the catalog is still ranked by Euclidean distance.

* **QE** works on the query, at query time: one search for its neighbours, then the
  search with the expanded vector (the filters apply to the second). Every search
  back-end and every query path (CLI, service, ``evaluate``) does it, because
  :meth:`~fashionrec.index.CatalogIndex.search_rows` does.
* **DBA** works on the catalog, when its vectors are made: each catalog vector is
  replaced by the mean over its ``k`` nearest *other* catalog vectors (before any is
  replaced). A product added later is augmented against the catalog it joins; the
  products already there keep their vectors (retraining, or a compaction after many
  adds, does not redo them: the next training does).

A setting is ``{"k": int >= 1, "alpha": float >= 0}``; ``None`` or ``k == 0`` is off.
The run records both in its search spec (``run.json``'s ``search``), which is where
every reader finds them.
"""

from __future__ import annotations

import numpy as np

from .errors import FashionrecError

DEFAULT_ALPHA = 3.0


def resolve(setting, what="query expansion"):
    """A checked ``{"k", "alpha"}`` setting, or ``None`` (off)."""
    if not setting:
        return None
    if not isinstance(setting, dict) or set(setting) - {"k", "alpha"}:
        raise FashionrecError(f"{what} must be {{'k': n, 'alpha': a}}, got {setting!r}")
    k, alpha = setting.get("k", 0), setting.get("alpha", DEFAULT_ALPHA)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise FashionrecError(f"{what} k must be an integer >= 0, got {k!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise FashionrecError(f"{what} alpha must be a number >= 0, got {alpha!r}")
    return {"k": int(k), "alpha": float(alpha)} if k else None


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def weighted_mean(vectors, neighbours, alpha):
    """``(M, D)`` vectors each replaced by the mean of itself (weight 1) and its
    ``(M, k, D)`` neighbours (weight ``max(cos, 0) ** alpha``)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    neighbours = np.asarray(neighbours, dtype=np.float32)
    sim = np.einsum("md,mkd->mk", _unit(vectors), _unit(neighbours))
    w = np.clip(sim, 0.0, None) ** alpha
    total = vectors + np.einsum("mk,mkd->md", w, neighbours)
    return (total / (1.0 + w.sum(axis=1, keepdims=True))).astype(np.float32)


def expand(vectors, catalog, backend, setting, exclude_rows=None, batch=2048):
    """``vectors`` expanded by their ``setting["k"]`` nearest rows of ``catalog``
    (``(N, D)``, searched by ``backend``, a :class:`~fashionrec.search.SearchBackend`
    over it); ``exclude_rows``: each query's own row (``-1``: none), never its own
    neighbour."""
    setting = resolve(setting)
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if setting is None or not len(vectors):
        return vectors
    out = np.empty_like(vectors)
    for start in range(0, len(vectors), batch):
        q = vectors[start:start + batch]
        ex = None if exclude_rows is None else np.asarray(exclude_rows)[start:start + batch]
        rows, _ = backend.search(q, setting["k"], None, ex)
        valid = rows >= 0
        neighbours = np.asarray(catalog[np.where(valid, rows, 0).reshape(-1)]).reshape(
            *rows.shape, -1) * valid[..., None]
        out[start:start + batch] = weighted_mean(q, neighbours, setting["alpha"])
    return out


def augment_catalog(vectors, backend, setting):
    """DBA: every row of ``vectors`` (``(N, D)``, searched by ``backend``) replaced by
    its mean with its ``k`` nearest other rows."""
    setting = resolve(setting, "database-side augmentation")
    vectors = np.asarray(vectors, dtype=np.float32)
    if setting is None or len(vectors) < 2:
        return vectors
    k = min(setting["k"], len(vectors) - 1)
    return expand(vectors, vectors, backend, {**setting, "k": k},
                  exclude_rows=np.arange(len(vectors)))
