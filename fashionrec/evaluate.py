"""Evaluate — how good are the recommendations, measured the way the field names it.

A retrieved item is *relevant* when it has the query's class. For each query set:

* ``precision@k`` — relevant items among the first k, divided by k;
* ``recall@k`` — relevant items among the first k, divided by all relevant items in
  the catalog (excluding the query itself);
* ``map@k`` — mean over queries of AP@k = sum_i P@i * rel_i / min(k, R), R the
  number of relevant catalog items;
* ``1nn_accuracy`` — the nearest item has the query's class.

Two query sets: every catalog item against the rest of the catalog (leave-one-out),
and held-out test images that are not in the catalog. Distances are computed in
blocks (:func:`fashionrec.index.knn_search`), never as a full N x N matrix.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix

from .errors import FashionrecError
from .extract import cached_features

KS = (1, 6, 10)


# ---------------------------------------------------------------- metrics
def relevance(query_labels, retrieved_labels):
    """``(M, K)`` booleans: retrieved item j of query i has the query's label."""
    return np.asarray(retrieved_labels) == np.asarray(query_labels)[:, None]


def precision_at_k(relevant, k):
    """Per-query precision@k of a ``(M, >=k)`` relevance matrix."""
    return np.asarray(relevant, dtype=float)[:, :k].mean(axis=1)


def recall_at_k(relevant, n_relevant, k):
    """Per-query recall@k; ``n_relevant`` is each query's number of relevant items
    (queries with none give NaN)."""
    hits = np.asarray(relevant, dtype=float)[:, :k].sum(axis=1)
    n = np.asarray(n_relevant, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hits / n, np.nan)


def average_precision_at_k(relevant, n_relevant, k):
    """Per-query AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant)."""
    rel = np.asarray(relevant, dtype=float)[:, :k]
    prec = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    denom = np.minimum(k, np.asarray(n_relevant, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (prec * rel).sum(axis=1) / denom, np.nan)


def one_nn_accuracy(relevant):
    """Per-query 1-NN accuracy: is the nearest item relevant?"""
    return np.asarray(relevant, dtype=float)[:, 0]


def retrieval_scores(query_labels, retrieved_labels, n_relevant, ks=KS):
    """Per-query arrays of every metric, keyed ``precision@k``, ``recall@k``,
    ``map@K`` (K the largest k) and ``1nn_accuracy``."""
    rel = relevance(query_labels, retrieved_labels)
    scores = {}
    for k in ks:
        scores[f"precision@{k}"] = precision_at_k(rel, k)
    for k in ks:
        scores[f"recall@{k}"] = recall_at_k(rel, n_relevant, k)
    scores[f"map@{max(ks)}"] = average_precision_at_k(rel, n_relevant, max(ks))
    scores["1nn_accuracy"] = one_nn_accuracy(rel)
    return scores


def _mean(values):
    """Mean over the queries a metric applies to (NaN marks the others); None if none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def summarize(scores, query_labels, class_names):
    """Overall and per-class means of per-query scores."""
    labels = np.asarray(query_labels)
    out = {"n_queries": int(len(labels)),
           "overall": {k: _mean(v) for k, v in scores.items()},
           "per_class": {}}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            out["per_class"][name] = {k: _mean(v[mask]) for k, v in scores.items()}
            out["per_class"][name]["n_queries"] = int(mask.sum())
    return out


def evaluate_vectors(index, query_vectors, query_labels, exclude_rows=None, ks=KS):
    """Score queries already in the index's (standardized) space."""
    rows, _ = index.search_rows(query_vectors, max(ks), exclude_rows)
    counts = np.bincount(index.labels, minlength=len(index.class_names))
    n_relevant = counts[np.asarray(query_labels)] - (exclude_rows is not None)
    scores = retrieval_scores(query_labels, index.labels[rows], n_relevant, ks)
    return summarize(scores, query_labels, index.class_names)


# ---------------------------------------------------------------- a run
def evaluate(rec, n_heldout=None, cache_dir=None, ks=KS, progress=True, log=print):
    """Score a trained :class:`~fashionrec.recommend.Recommender`.

    Args:
        rec: a fitted or loaded recommender.
        n_heldout: held-out queries, taken from the test images after the catalog
            (default: all of them).
        cache_dir: feature cache folder (a run's ``features/``) so images already
            extracted are not extracted again.

    Returns:
        A dict with ``catalog_loo`` and ``heldout`` retrieval results (overall and per
        class), the head's accuracy and confusion matrix on the test images used, and
        ``primary_metric`` naming the headline number.
    """
    say = log or (lambda *_: None)
    index = rec.index_
    if rec.is_catalog:
        raise FashionrecError("evaluate scores a run against its dataset's test split; a "
                              "product-catalog run has none (its head accuracy on held-back "
                              "products is in run.json: head_val_accuracy)")
    x_test, y_test = rec.test_images()
    n_reco = len(index)
    if not np.array_equal(index.ids, np.arange(n_reco)):
        raise FashionrecError("evaluate expects a catalog of the first N test images")
    available = len(x_test) - n_reco
    n_heldout = available if n_heldout is None else n_heldout
    if not 0 <= n_heldout <= available:
        raise FashionrecError(f"n_heldout must be in 0..{available}, got {n_heldout}")

    say(f"evaluate: {n_reco} catalog items leave-one-out, {n_heldout} held-out queries")
    result = {"primary_metric": "heldout/map@10" if n_heldout else "catalog_loo/map@10",
              "ks": list(ks),
              "catalog_loo": evaluate_vectors(index, index.vectors, index.labels,
                                              np.arange(n_reco), ks)}

    def features(images, name):
        if cache_dir is None:
            return rec.extractor.transform(images, progress)
        return cached_features(rec.extractor, images, cache_dir, name, progress)

    f_cat = features(x_test[:n_reco], "catalog")
    predicted, truth = [rec.head_.predict(f_cat)], [y_test[:n_reco]]
    if n_heldout:
        x_h, y_h = x_test[n_reco:n_reco + n_heldout], y_test[n_reco:n_reco + n_heldout]
        f_h = features(x_h, "heldout")
        predicted.append(rec.head_.predict(f_h))
        truth.append(y_h)
        vectors = index.transform(rec.head_.embed(f_h))
        result["heldout"] = evaluate_vectors(index, vectors, y_h, None, ks)
    predicted, truth = np.concatenate(predicted), np.concatenate(truth)
    cm = confusion_matrix(truth, predicted, labels=np.arange(len(index.class_names)))
    result["head"] = {
        "n_images": int(len(truth)),
        "accuracy": float((predicted == truth).mean()),
        "per_class_accuracy": {name: float(cm[c, c] / max(cm[c].sum(), 1))
                               for c, name in enumerate(index.class_names)},
        "confusion_matrix": cm.tolist(),
        "class_names": list(index.class_names),
    }
    return result


def _fmt(value):
    return "-" if value is None else f"{value:.4f}"


def format_table(result):
    """The evaluation as a plain-text table."""
    sets = [s for s in ("catalog_loo", "heldout") if s in result]
    keys = list(result[sets[0]]["overall"])
    names = {"catalog_loo": "catalog (leave-one-out)", "heldout": "held-out queries"}
    lines = [f"{'metric':<14}" + "".join(f"{names[s]:>26}" for s in sets)]
    lines += [f"{k:<14}" + "".join(f"{_fmt(result[s]['overall'][k]):>26}" for s in sets)
              for k in keys]
    lines.append(f"{'queries':<14}" + "".join(f"{result[s]['n_queries']:>26}" for s in sets))
    main = sets[-1]
    lines += ["", f"per class ({names[main]}):",
              f"{'class':<14}{'precision@6':>12}{'map@10':>10}{'1nn_acc':>10}{'head_acc':>10}"]
    for name, row in result[main]["per_class"].items():
        lines.append(f"{name:<14}{_fmt(row.get('precision@6')):>12}{_fmt(row.get('map@10')):>10}"
                     f"{_fmt(row['1nn_accuracy']):>10}"
                     f"{_fmt(result['head']['per_class_accuracy'][name]):>10}")
    lines.append(f"\nhead accuracy on {result['head']['n_images']} test images: "
                 f"{result['head']['accuracy']:.4f}")
    return "\n".join(lines)
