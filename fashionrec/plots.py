"""Figures people would rather look at: training curves, recommendation grids and
evaluation charts. Each ``plot_*`` writes a PNG of its ``*_figure``.

Uses matplotlib's non-interactive Agg canvas; every PNG is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .artifacts import atomic_path


def _save(fig, path):
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def plot_history(history, path, title="head training"):
    """Accuracy and loss per epoch, train and validation, side by side (a PNG)."""
    return _save(history_figure(history, title), path)


def history_figure(history, title="head training"):
    """The figure of :func:`plot_history`."""
    fig = Figure(figsize=(10, 4))
    for ax, metric in zip(fig.subplots(1, 2), ("accuracy", "loss"), strict=True):
        epochs = range(1, len(history.get(metric, [])) + 1)
        ax.plot(epochs, history.get(metric, []), label=f"train {metric}", marker=".")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], label=f"validation {metric}", marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{title}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def _short(item_id, width=24):
    """An id that fits under a thumbnail: a long path keeps its last whole levels."""
    text = str(item_id)
    if len(text) <= width:
        return text
    parts = text.split("/")
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if len(part) + len(tail) + 3 > width:
            break
        tail = f"{part}/{tail}"
    return "…/" + tail if len(tail) + 2 <= width else "…" + tail[-(width - 1):]


def plot_recommendation(recommendation, query_image, item_image, path):
    """The query beside its recommended items, each titled with its id, class and
    distance (the same facts as the text and JSON output), as a PNG.

    Args:
        recommendation: a :class:`~fashionrec.recommend.Recommendation`.
        query_image: the query as a 2-D gray or ``(H, W, 3)`` RGB array.
        item_image: callable giving an item's image by id (``None``: not available).
    """
    return _save(recommendation_figure(recommendation, query_image, item_image), path)


def recommendation_figure(recommendation, query_image, item_image):
    """The figure of :func:`plot_recommendation`: one panel per image."""
    items = recommendation.items
    q = recommendation.query
    fig = Figure(figsize=(2.4 * (len(items) + 1), 2.9))
    axes = fig.subplots(1, len(items) + 1, squeeze=False)[0]
    if q["kind"] == "test_index":
        qtitle = f"query #{q['test_index']}\n{q['true_class']}\n(pred. {q['predicted_class']})"
    elif q["kind"] == "item":
        qtitle = f"query {_short(q['id'])}\n{q['true_class']}"
    else:
        qtitle = f"query {_short(Path(q.get('source', 'image')).name)}\n" \
                 f"(pred. {q['predicted_class']})"
    if q.get("filter"):
        qtitle += f"\nonly {q['filter']}"

    def show(ax, image, title, color="black"):
        if image is None:
            ax.text(0.5, 0.5, "image\nmissing", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None)
        ax.set_title(title, fontsize=7, color=color)

    show(axes[0], query_image, qtitle, "tab:blue")
    for ax, item in zip(axes[1:], items, strict=True):
        show(ax, item_image(item.id),
             f"{item.rank}. {_short(item.id)}\n{item.class_name}\nd={item.distance:.2f}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def plot_per_class(result, path, metric="precision@6"):
    """Bar chart of ``metric`` per class for each query set of an evaluation (a PNG)."""
    return _save(per_class_figure(result, metric), path)


def per_class_figure(result, metric="precision@6"):
    """The figure of :func:`plot_per_class`: one group of bars per class, one bar per
    query set (leave-one-out, held-out, raw features with cosine), the head's accuracy
    per class as dots."""
    from .evaluate import query_sets, set_title

    sets = query_sets(result)
    names = result["head"]["class_names"]
    fig = Figure(figsize=(max(8, 0.9 * len(names) + 3), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(sets)
    x = np.arange(len(names))
    for i, s in enumerate(sets):
        values = [result[s]["per_class"].get(n, {}).get(metric, np.nan) for n in names]
        values = [np.nan if v is None else v for v in values]
        ax.bar(x + (i - (len(sets) - 1) / 2) * width, values, width, label=set_title(result, s))
    head = result["head"]["per_class_accuracy"]
    ax.plot(x, [head[n] for n in names], "k.", markersize=9, label="head accuracy")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per class" + (" (optimistic)" if result.get("optimistic") else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", framealpha=0.9, fontsize=8)
    return fig


def plot_confusion(result, path):
    """The head's confusion matrix on the evaluated images (a PNG)."""
    return _save(confusion_figure(result), path)


def confusion_figure(result):
    """The figure of :func:`plot_confusion`."""
    from sklearn.metrics import ConfusionMatrixDisplay

    head = result["head"]
    what = "held-out products" if result.get("kind") == "catalog" else "test images"
    if result.get("optimistic"):
        what = "catalog products, optimistic"
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.array(head["confusion_matrix"]),
                           display_labels=head["class_names"]).plot(
        ax=ax, xticks_rotation=45, colorbar=False, values_format="d")
    ax.set_title(f"head confusion matrix ({head['n_images']} {what}, "
                 f"accuracy {head['accuracy']:.3f})")
    return fig
