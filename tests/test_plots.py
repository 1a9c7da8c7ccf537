"""The figures of fashionrec.plots: what each panel shows (built through the
``*_figure`` functions), and the PNGs the ``plot_*`` functions write, read back."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from fashionrec.plots import (
    confusion_figure,
    history_figure,
    plot_confusion,
    plot_history,
    plot_recommendation,
    recommendation_figure,
)
from fashionrec.recommend import Item, Recommendation

DPI = 110  # what fashionrec.plots saves its PNGs at
PAD_INCHES = 0.1  # matplotlib's margin around a bbox_inches="tight" figure


def assert_png_of(path, fig):
    """``path`` is a PNG of ``fig`` at DPI: not blank, and as many pixels as the figure
    gives. The plots are saved with ``bbox_inches="tight"``, so the image is the
    figure's tight bounding box (plus matplotlib's margin) at DPI, not the whole canvas
    (figure size x DPI)."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.info["dpi"] == pytest.approx((DPI, DPI), abs=0.01)
        pixels = np.asarray(img.convert("RGB"), dtype=float)
    fig.set_dpi(DPI)
    box = fig.get_tightbbox(FigureCanvasAgg(fig).get_renderer())  # inches
    want = ((box.width + 2 * PAD_INCHES) * DPI, (box.height + 2 * PAD_INCHES) * DPI)
    height, width, _ = pixels.shape
    assert width == pytest.approx(want[0], abs=2) and height == pytest.approx(want[1], abs=2)
    # the tight box is the canvas less its empty margins: well over half of it
    full_w, full_h = fig.get_size_inches() * DPI
    assert 0.5 * full_w < width <= 1.1 * full_w and 0.5 * full_h < height <= 1.1 * full_h
    assert pixels.std() > 0  # not a blank image
    return pixels


def panel_images(ax):
    """The arrays an axes shows."""
    return [np.asarray(im.get_array()) for im in ax.get_images()]


# ------------------------------------------------------------------ training curves
HISTORY = {"accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.4, 0.6, 0.65],
           "loss": [1.0, 0.6, 0.5], "val_loss": [1.1, 0.8, 0.7]}


def test_history_figure_has_train_and_validation_curves_per_metric():
    fig = history_figure(HISTORY, title="tiny run")
    assert len(fig.axes) == 2
    for ax, metric in zip(fig.axes, ("accuracy", "loss"), strict=True):
        assert ax.get_title() == f"tiny run: {metric}"
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("epoch", metric)
        train, val = ax.get_lines()
        assert train.get_label() == f"train {metric}"
        assert val.get_label() == f"validation {metric}"
        assert list(train.get_xdata()) == list(val.get_xdata()) == [1, 2, 3]
        assert list(train.get_ydata()) == HISTORY[metric]
        assert list(val.get_ydata()) == HISTORY[f"val_{metric}"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            f"train {metric}", f"validation {metric}"]


def test_history_without_validation_has_train_curves_only():
    """A head trained on train+validation has no validation curve to draw."""
    history = {"accuracy": [0.5, 0.7], "loss": [1.0, 0.6]}
    fig = history_figure(history)
    assert len(fig.axes) == 2
    for ax, metric in zip(fig.axes, ("accuracy", "loss"), strict=True):
        (train,) = ax.get_lines()
        assert train.get_label() == f"train {metric}"
        assert list(train.get_ydata()) == history[metric]


def test_history_plot_is_a_png_of_its_figure(tmp_path):
    path = plot_history(HISTORY, tmp_path / "plots" / "curves.png")
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left
    assert_png_of(path, history_figure(HISTORY))


# ------------------------------------------------------------------ recommendation grids
def test_recommendation_grid_shows_the_query_and_each_item(tmp_path):
    result = Recommendation(
        query={"kind": "test_index", "test_index": 7, "true_class": "Bag",
               "predicted_class": "Coat", "probability": 0.9},
        items=[Item(r + 1, r, 8, "Bag", 0.25 + r) for r in range(3)],
    )
    images = np.random.default_rng(0).integers(0, 255, (3, 28, 28))
    query_image = images[0]
    fig = recommendation_figure(result, query_image, lambda i: images[i])
    axes = fig.axes
    assert len(axes) == 1 + len(result.items)
    query = axes[0].get_title()
    assert "#7" in query and "Bag" in query and "Coat" in query
    (shown,) = panel_images(axes[0])
    np.testing.assert_array_equal(shown, query_image)
    assert axes[0].get_images()[0].get_cmap().name == "gray"  # a 2-D image: gray
    for ax, rank, distance in zip(axes[1:], (1, 2, 3), ("0.25", "1.25", "2.25"), strict=True):
        item_id = rank - 1
        title = ax.get_title()
        assert title.startswith(f"{rank}. {item_id}\n")
        assert "Bag" in title and f"d={distance}" in title
        (shown,) = panel_images(ax)
        np.testing.assert_array_equal(shown, images[item_id])
    for ax in axes:
        assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
    path = plot_recommendation(result, query_image, lambda i: images[i], tmp_path / "r.png")
    assert_png_of(path, recommendation_figure(result, query_image, lambda i: images[i]))


def test_product_grid_shows_colour_long_ids_and_missing_images(tmp_path):
    query_id = "Shoes/Boots/acme/very-long-product-name-0001.jpg"
    ids = ["Shoes/Boots/acme/0.jpg", "Shoes/Boots/acme/1.jpg", "Shoes/Boots/acme/2.jpg",
           "Shoes/Boots/acme-outdoor/3.jpg"]
    result = Recommendation(
        query={"kind": "item", "id": query_id,
               "true_class": "Shoes/Boots", "category": "Shoes/Boots/acme",
               "filter": "category Shoes", "n_candidates": 5},
        items=[Item(r + 1, i, 0, "Shoes/Boots", 0.5 * r, "Shoes/Boots/acme", f"/shop/{r}.jpg")
               for r, i in enumerate(ids)],
    )
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3)).astype(np.uint8)

    def image_of(i):
        return None if i.endswith("1.jpg") else rgb

    fig = recommendation_figure(result, rgb, image_of)
    axes = fig.axes
    assert len(axes) == 1 + len(ids)
    # ids longer than a thumbnail's width (24 characters) are shortened: a path keeps
    # its last whole levels that fit, a single too-long name its last 23 characters
    query = axes[0].get_title()
    assert query.startswith("query …g-product-name-0001.jpg\n")
    assert "Shoes/Boots" in query and "only category Shoes" in query
    (shown,) = panel_images(axes[0])
    assert shown.shape == (40, 40, 3)  # shown in colour
    np.testing.assert_array_equal(shown, rgb)
    short = {"Shoes/Boots/acme/0.jpg": "Shoes/Boots/acme/0.jpg",  # 22 characters: kept
             "Shoes/Boots/acme/1.jpg": "Shoes/Boots/acme/1.jpg",
             "Shoes/Boots/acme/2.jpg": "Shoes/Boots/acme/2.jpg",
             "Shoes/Boots/acme-outdoor/3.jpg": "…/acme-outdoor/3.jpg"}
    for ax, item in zip(axes[1:], result.items, strict=True):
        title = ax.get_title()
        assert title.startswith(f"{item.rank}. {short[item.id]}\n")
        assert f"d={item.distance:.2f}" in title and "Shoes/Boots" in title
        if item.id == "Shoes/Boots/acme/1.jpg":  # no image: the placeholder text
            assert panel_images(ax) == []
            assert [t.get_text() for t in ax.texts] == ["image\nmissing"]
        else:
            (shown,) = panel_images(ax)
            np.testing.assert_array_equal(shown, rgb)
            assert len(ax.texts) == 0
    path = plot_recommendation(result, rgb, image_of, tmp_path / "p.png")
    pixels = assert_png_of(path, recommendation_figure(result, rgb, image_of))
    assert (np.ptp(pixels, axis=2) > 0).any()  # a colour image, not only grays


# ------------------------------------------------------------------ evaluation
def test_confusion_figure_shows_the_matrix_and_its_title(tmp_path):
    matrix = [[3, 1], [0, 2]]
    result = {"kind": "catalog", "optimistic": False,
              "head": {"confusion_matrix": matrix, "class_names": ["Boots", "Totes"],
                       "n_images": 6, "accuracy": 5 / 6}}
    fig = confusion_figure(result)
    ax = fig.axes[0]
    assert ax.get_title() == "head confusion matrix (6 held-out products, accuracy 0.833)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Boots", "Totes"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Boots", "Totes"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for r in matrix for v in r)
    path = plot_confusion(result, tmp_path / "confusion.png")
    assert_png_of(path, confusion_figure(result))
