"""Evaluate — how good are the recommendations, measured the way the field names it.

A retrieved item is *relevant* when it has the query's class. For each query set:

* ``precision@k`` — relevant items among the first k, divided by k;
* ``recall@k`` — relevant items among the first k, divided by all relevant items in
  the catalog (excluding the query itself);
* ``map@k`` — mean over queries of AP@k = sum_i P@i * rel_i / min(k, R), R the
  number of relevant catalog items;
* ``1nn_accuracy`` — the nearest item has the query's class.

:class:`RetrievalEvaluator` (queries, corpus, relevance -> named metrics with a primary
one) and :class:`ClassificationEvaluator` (the head's accuracy and confusion matrix)
are the contract; :func:`evaluate` uses them on a run: for Fashion-MNIST, every
catalog item against the rest (leave-one-out) and held-out test images that are not
in the catalog; for a product catalog, the held-out products against the whole
catalog, beside the raw backbone features with cosine on the same queries.
Searches go through the run's search back-end, never a full N x N matrix.
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


class RetrievalEvaluator:
    """Queries against a corpus, scored the way the field names it.

    One contract for every run (in the spirit of sentence-transformers' evaluators):
    the queries' labels and, for queries that are corpus items themselves, their own
    rows (never retrieved, not counted as relevant) are fixed; calling the evaluator
    with a corpus (anything with ``search_rows``, ``labels`` and ``class_names``, such
    as a :class:`~fashionrec.index.CatalogIndex`) and the queries' vectors in its
    space gives named metrics and names the primary one. A retrieved item is relevant
    when it has the query's class.

    Args:
        query_labels: ``(M,)`` class numbers of the queries.
        exclude_rows: ``(M,)`` corpus row of each query, or ``None`` (queries from
            outside the corpus).
        ks: the cut-offs of precision@k and recall@k; mAP is taken at the largest.
        name: what the result is called (``heldout``, ``catalog_loo``, ...).

    Example:
        >>> ev = RetrievalEvaluator(index.labels, np.arange(len(index)), name="loo")  # doctest: +SKIP
        >>> ev(index, index.vectors)["overall"]["precision@6"]                        # doctest: +SKIP
    """

    def __init__(self, query_labels, exclude_rows=None, ks=KS, name="queries"):
        self.query_labels = np.asarray(query_labels)
        self.exclude_rows = None if exclude_rows is None else np.asarray(exclude_rows)
        self.ks = tuple(ks)
        self.name = name
        self.primary_metric = f"map@{max(self.ks)}"

    def __call__(self, corpus, query_vectors):
        """``{"n_queries", "overall", "per_class", "primary_metric"}`` for these vectors."""
        if len(query_vectors) != len(self.query_labels):
            raise FashionrecError(f"{len(query_vectors)} query vectors for "
                                  f"{len(self.query_labels)} query labels")
        rows, _ = corpus.search_rows(query_vectors, max(self.ks), self.exclude_rows)
        counts = np.bincount(corpus.labels, minlength=len(corpus.class_names))
        n_relevant = counts[self.query_labels] - (self.exclude_rows is not None)
        scores = retrieval_scores(self.query_labels, np.asarray(corpus.labels)[rows],
                                  n_relevant, self.ks)
        out = summarize(scores, self.query_labels, corpus.class_names)
        out["primary_metric"] = self.primary_metric
        return out


class ClassificationEvaluator:
    """The head's predictions against the truth: accuracy, per-class accuracy and the
    confusion matrix (rows: true class, columns: predicted)."""

    def __init__(self, true_labels, class_names):
        self.true_labels = np.asarray(true_labels)
        self.class_names = list(class_names)
        self.primary_metric = "accuracy"

    def __call__(self, predicted):
        predicted = np.asarray(predicted)
        cm = confusion_matrix(self.true_labels, predicted,
                              labels=np.arange(len(self.class_names)))
        return {
            "n_images": int(len(self.true_labels)),
            "accuracy": float((predicted == self.true_labels).mean()),
            "per_class_accuracy": {name: float(cm[c, c] / max(cm[c].sum(), 1))
                                   for c, name in enumerate(self.class_names)},
            "confusion_matrix": cm.tolist(),
            "class_names": self.class_names,
            "primary_metric": self.primary_metric,
        }


def evaluate_vectors(index, query_vectors, query_labels, exclude_rows=None, ks=KS):
    """Score queries already in the index's (standardized) space."""
    return RetrievalEvaluator(query_labels, exclude_rows, ks)(index, query_vectors)


def raw_cosine_corpus(features, labels, class_names):
    """The tutorials' method as a corpus: raw backbone features, L2-normalized (so
    Euclidean ranking is cosine ranking), searched exactly."""
    from .index import CatalogIndex

    unit = _unit(features)
    return CatalogIndex(unit, np.arange(len(unit)), labels, class_names, scaler=None), unit


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- a run
def evaluate(rec, n_heldout=None, cache_dir=None, ks=KS, progress=True, log=print):
    """Score a trained :class:`~fashionrec.recommend.Recommender`.

    Fashion-MNIST runs: every catalog item against the rest (leave-one-out) and the
    test images after the catalog (held out). Product-catalog runs: the held-out
    products (``test/`` of split folders, or ``--holdout``) query the whole catalog,
    never getting themselves back, next to the raw backbone features with cosine on
    the same queries; a run without held-out products is scored leave-one-out and
    flagged ``optimistic`` (those products trained the head).

    Args:
        rec: a fitted or loaded recommender.
        n_heldout: Fashion-MNIST runs: held-out queries, taken from the test images
            after the catalog (default: all of them).
        cache_dir: feature cache folder (a run's ``features/``) so images already
            extracted are not extracted again.

    Returns:
        A dict with one retrieval result per query set (overall and per class), the
        head's accuracy and confusion matrix on the images used, and
        ``primary_metric`` naming the headline number.
    """
    say = log or (lambda *_: None)
    if rec.is_catalog:
        if n_heldout is not None:
            raise FashionrecError("--n-heldout is for Fashion-MNIST runs; a catalog run's "
                                  "held-out products were chosen when it was trained")
        return _evaluate_catalog(rec, cache_dir, ks, progress, say)
    return _evaluate_dataset(rec, n_heldout, cache_dir, ks, progress, say)


def _evaluate_dataset(rec, n_heldout, cache_dir, ks, progress, say):
    index = rec.index_
    x_test, y_test = rec.test_images()
    n_reco = len(index)
    if not np.array_equal(index.ids, np.arange(n_reco)):
        raise FashionrecError("evaluate expects a catalog of the first N test images")
    available = len(x_test) - n_reco
    n_heldout = available if n_heldout is None else n_heldout
    if not 0 <= n_heldout <= available:
        raise FashionrecError(f"n_heldout must be in 0..{available}, got {n_heldout}")

    say(f"evaluate: {n_reco} catalog items leave-one-out, {n_heldout} held-out queries")
    loo = RetrievalEvaluator(index.labels, np.arange(n_reco), ks, "catalog_loo")
    result = {"kind": "dataset",
              "primary_metric": "heldout/map@10" if n_heldout else "catalog_loo/map@10",
              "ks": list(ks), "catalog_loo": loo(index, index.vectors)}

    def features(images, name):
        if cache_dir is None:
            return rec.extractor.transform(images, progress)
        return cached_features(rec.extractor, images, cache_dir, name, progress)

    f_cat = features(x_test[:n_reco], "catalog")
    predicted, truth = [rec.head_.predict(f_cat)], [y_test[:n_reco]]
    if n_heldout:
        x_h, y_h = x_test[n_reco:n_reco + n_heldout], y_test[n_reco:n_reco + n_heldout]
        f_h = features(x_h, "heldout")
        probs, vectors = rec.embedder_.encode_features([f_h])
        predicted.append(probs.argmax(axis=1))
        truth.append(y_h)
        result["heldout"] = RetrievalEvaluator(y_h, None, ks, "heldout")(index, vectors)
    head = ClassificationEvaluator(np.concatenate(truth), index.class_names)
    result["head"] = head(np.concatenate(predicted))
    return result


def _evaluate_catalog(rec, cache_dir, ks, progress, say):
    index = rec.index_
    split = rec.split_
    wanted = split.heldout_ids if split is not None else []
    rows = np.array([r for r in (index.row_of(i) for i in wanted) if r is not None], dtype=int)
    if len(wanted) and len(rows) < len(wanted):
        say(f"evaluate: {len(wanted) - len(rows)} held-out product(s) were removed since "
            f"training; scoring the {len(rows)} still in the catalog")
    optimistic = len(rows) == 0
    if optimistic:
        why = ("all its held-out products were removed" if len(wanted) else
               "this run has no held-out products")
        say(f"evaluate: {why} (train with split folders or --holdout 0.2 for an honest "
            f"score); scoring every product against the rest (leave-one-out), which is "
            f"OPTIMISTIC: these products trained the head")
        rows = np.arange(len(index))
    name = "catalog_loo" if optimistic else "heldout"
    say(f"evaluate: {len(rows)} {'catalog' if optimistic else 'held-out'} products query "
        f"the {len(index)} of the catalog")
    # raw backbone features per row, one array per view (the first: the photo as is)
    views = rec.catalog_features(cache_dir, progress)
    feats = views[0]
    labels = index.labels[rows]
    evaluator = RetrievalEvaluator(labels, rows, ks, name)
    baseline, unit = raw_cosine_corpus(feats, index.labels, index.class_names)
    result = {"kind": "catalog", "optimistic": optimistic,
              "primary_metric": f"{name}/map@{max(ks)}", "ks": list(ks),
              name: evaluator(index, np.asarray(index.vectors[rows])),
              "raw_cosine": evaluator(baseline, unit[rows])}
    head = ClassificationEvaluator(labels, index.class_names)
    probs, _ = rec.head_outputs([v[rows] for v in views])
    result["head"] = head(probs.argmax(axis=1))
    result["head"]["optimistic"] = optimistic
    return result


def _fmt(value):
    return "-" if value is None else f"{value:.4f}"


SET_NAMES = {"catalog_loo": "catalog (leave-one-out)", "heldout": "held-out queries",
             "raw_cosine": "raw features, cosine"}
SET_ORDER = ("catalog_loo", "heldout", "raw_cosine")


def query_sets(result):
    """The query sets an evaluation holds, in display order."""
    return [s for s in SET_ORDER if s in result]


def set_title(result, name):
    """How a query set is called in tables and plots."""
    title = SET_NAMES[name]
    if name == "raw_cosine":
        main = query_sets(result)[0]
        return f"{title} ({'same queries' if main == 'heldout' else 'leave-one-out'})"
    if name == "catalog_loo" and result.get("optimistic"):
        return f"{title}, optimistic"
    return title


def format_table(result):
    """The evaluation as a plain-text table: metrics per query set, then per class."""
    sets = query_sets(result)
    keys = list(result[sets[0]]["overall"])
    width = max(26, *(len(set_title(result, s)) + 2 for s in sets))
    lines = []
    if result.get("optimistic"):
        lines += ["NOTE: this run has no held-out products; these are leave-one-out scores "
                  "over products that trained the head (optimistic).", ""]
    lines.append(f"{'metric':<14}" + "".join(f"{set_title(result, s):>{width}}" for s in sets))
    lines += [f"{k:<14}" + "".join(f"{_fmt(result[s]['overall'][k]):>{width}}" for s in sets)
              for k in keys]
    lines.append(f"{'queries':<14}" + "".join(f"{result[s]['n_queries']:>{width}}"
                                              for s in sets))
    main = "heldout" if "heldout" in sets else sets[0]
    raw = "raw_cosine" in sets
    lines += ["", f"per class ({set_title(result, main)}):",
              f"{'class':<14}{'precision@6':>12}{'map@10':>10}{'1nn_acc':>10}{'head_acc':>10}"
              + (f"{'raw p@6':>10}" if raw else "")]
    for name, row in result[main]["per_class"].items():
        line = (f"{name:<14}{_fmt(row.get('precision@6')):>12}{_fmt(row.get('map@10')):>10}"
                f"{_fmt(row['1nn_accuracy']):>10}"
                f"{_fmt(result['head']['per_class_accuracy'][name]):>10}")
        if raw:
            line += f"{_fmt(result['raw_cosine']['per_class'][name].get('precision@6')):>10}"
        lines.append(line)
    what = "held-out products" if result.get("kind") == "catalog" else "test images"
    if result.get("optimistic"):
        what = "catalog products (trained on: optimistic)"
    lines.append(f"\nhead accuracy on {result['head']['n_images']} {what}: "
                 f"{result['head']['accuracy']:.4f}")
    return "\n".join(lines)
