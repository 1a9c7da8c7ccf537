import numpy as np

from fashionrec.plots import plot_history, plot_recommendation
from fashionrec.recommend import Item, Recommendation


def test_history_plot_is_a_png(tmp_path):
    history = {"accuracy": [0.5, 0.7], "val_accuracy": [0.4, 0.6],
               "loss": [1.0, 0.6], "val_loss": [1.1, 0.8]}
    path = plot_history(history, tmp_path / "plots" / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]


def test_recommendation_grid_is_a_png(tmp_path):
    result = Recommendation(
        query={"kind": "test_index", "test_index": 7, "true_class": "Bag",
               "predicted_class": "Bag", "probability": 0.9},
        items=[Item(r + 1, r, 8, "Bag", float(r)) for r in range(3)],
    )
    images = np.random.default_rng(0).integers(0, 255, (3, 28, 28))
    path = plot_recommendation(result, images[0], lambda i: images[i], tmp_path / "r.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_product_grid_shows_colour_long_ids_and_missing_images(tmp_path):
    result = Recommendation(
        query={"kind": "item", "id": "Shoes/Boots/acme/very-long-product-name-0001.jpg",
               "true_class": "Shoes/Boots", "category": "Shoes/Boots/acme",
               "filter": "category Shoes", "n_candidates": 5},
        items=[Item(r + 1, f"Shoes/Boots/acme/{r}.jpg", 0, "Shoes/Boots", float(r),
                    "Shoes/Boots/acme", f"/shop/{r}.jpg") for r in range(3)],
    )
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3)).astype(np.uint8)
    path = plot_recommendation(result, rgb, lambda i: None if i.endswith("1.jpg") else rgb,
                               tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
