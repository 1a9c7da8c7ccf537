"""Figures people would rather look at: training curves and recommendation grids.

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
    """Accuracy and loss per epoch, train and validation, side by side."""
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
    return _save(fig, path)


def _short(item_id, width=26):
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
    distance (the same facts as the text and JSON output).

    Args:
        recommendation: a :class:`~fashionrec.recommend.Recommendation`.
        query_image: the query as a 2-D gray or ``(H, W, 3)`` RGB array.
        item_image: callable giving an item's image by id (``None``: not available).
    """
    items = recommendation.items
    q = recommendation.query
    fig = Figure(figsize=(2.0 * (len(items) + 1), 2.9))
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
    return _save(fig, path)


def plot_per_class(result, path, metric="precision@6"):
    """Bar chart of ``metric`` per class for each query set of an evaluation."""
    sets = [s for s in ("catalog_loo", "heldout") if s in result]
    labels = {"catalog_loo": "catalog leave-one-out", "heldout": "held-out queries"}
    names = result["head"]["class_names"]
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    width = 0.8 / len(sets)
    x = np.arange(len(names))
    for i, s in enumerate(sets):
        values = [result[s]["per_class"].get(n, {}).get(metric, np.nan) for n in names]
        ax.bar(x + (i - (len(sets) - 1) / 2) * width, values, width, label=labels[s])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", framealpha=0.9)
    return _save(fig, path)


def plot_confusion(result, path):
    """The head's confusion matrix on the evaluated test images."""
    from sklearn.metrics import ConfusionMatrixDisplay

    head = result["head"]
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.array(head["confusion_matrix"]),
                           display_labels=head["class_names"]).plot(
        ax=ax, xticks_rotation=45, colorbar=False, values_format="d")
    ax.set_title(f"head confusion matrix ({head['n_images']} test images, "
                 f"accuracy {head['accuracy']:.3f})")
    return _save(fig, path)
