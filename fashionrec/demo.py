"""A small product catalog made from Fashion-MNIST, in both layouts, for trying
fashionrec on "your own" images offline (``make demo-catalog``).

Each 28x28 Fashion-MNIST picture becomes a product photo: dark on white, tinted a
random colour (so colour tells nothing about the class), enlarged to an odd size
and saved as JPEG, PNG (some gray, some with a transparent background) or WebP.
The output folder holds:

* ``folder/<Category>/<Subcategory>/<brand>/<name>-<n>.<ext>`` — the image-folder
  layout (like UT Zappos50K), plus a few broken files and a too-small class;
* ``csv/styles.csv`` + ``csv/images/<id>.jpg`` — the CSV layout (like Kaggle's
  Fashion Product Images), plus a row without an image and a corrupt image;
* ``new/`` — new products in the folder layout (from the test split), to add later;
* ``query-*.png`` — new product photos to query with.

Usage: ``python -m fashionrec.demo OUT [--per-class N] [--seed S]``
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

from .data import load_split
from .errors import FashionrecError

# Fashion-MNIST class -> (folder category, subcategory, CSV masterCategory, subCategory,
# articleType)
PRODUCTS = {
    0: ("Clothing", "T-shirts", "Apparel", "Topwear", "Tshirts"),
    1: ("Clothing", "Trousers", "Apparel", "Bottomwear", "Trousers"),
    2: ("Clothing", "Pullovers", "Apparel", "Topwear", "Sweaters"),
    3: ("Clothing", "Dresses", "Apparel", "Dress", "Dresses"),
    4: ("Clothing", "Coats", "Apparel", "Topwear", "Jackets"),
    5: ("Footwear", "Sandals", "Footwear", "Sandal", "Sandals"),
    6: ("Clothing", "Shirts", "Apparel", "Topwear", "Shirts"),
    7: ("Footwear", "Sneakers", "Footwear", "Shoes", "Casual Shoes"),
    8: ("Accessories", "Bags", "Accessories", "Bags", "Handbags"),
    9: ("Footwear", "Boots", "Footwear", "Shoes", "Boots"),
}
BRANDS = ("acme", "northwind", "umbra")
GENDERS = ("Women", "Men", "Unisex")
COLOURS = ("Black", "White", "Red", "Blue", "Pink", "Green", "Grey")
SEASONS = ("Spring", "Summer", "Fall", "Winter")
OUTPUTS = ("folder", "csv", "new")  # the folders a demo catalog writes (and replaces)
MARKER = ".fashionrec-demo"  # in each of them: only such folders are ever deleted
FORMATS = ((".jpg", "RGB"), (".png", "L"), (".png", "RGBA"), (".webp", "RGB"), (".jpg", "RGB"))


def product_photo(image28, rng, mode="RGB"):
    """A 28x28 Fashion-MNIST image as a product photo (PIL image) of an odd size."""
    from PIL import Image

    ink = image28.astype(np.float32) / 255.0  # 1 where the garment is
    tint = rng.uniform(0.05, 0.75, size=3)  # the garment's colour
    rgb = 255.0 * (1.0 - ink[..., None] * (1.0 - tint))  # white background
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    w, h = int(rng.integers(56, 150)), int(rng.integers(56, 150))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        alpha = Image.fromarray((ink * 255).astype(np.uint8)).resize((w, h))
        img.putalpha(alpha.point(lambda v: 255 if v > 8 else 0))
    return img


def _save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        img.save(path, quality=92)
    else:
        img.save(path)


def _check_replaceable(out, subs=OUTPUTS):
    """Refuse (one line) when one of the folders a demo catalog replaces exists without
    the demo's marker: it is someone else's."""
    for sub in subs:
        path = out / sub
        if (path.exists() or path.is_symlink()) and not (
                path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()):
            raise FashionrecError(f"{path} exists and was not written by the demo (no "
                                  f"{MARKER} in it); move it away or choose another folder")


def make_demo_catalog(out, per_class=60, n_new=2, seed=0, data_dir=None):
    """Write the demo catalog under ``out`` (replacing an earlier one: only folders
    holding the demo's marker file are deleted); return a summary dict (counts and a
    few ids to try)."""
    out = Path(out)
    _check_replaceable(out)  # before any work: nothing of the user's is deleted
    x_train, y_train, _ = load_split("fashion_mnist", "train", data_dir)
    x_test, y_test, _ = load_split("fashion_mnist", "test", data_dir)
    rng = np.random.default_rng(seed)
    for sub in OUTPUTS:
        _check_replaceable(out, [sub])  # again, just before deleting it
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (out / sub).mkdir(parents=True)
        (out / sub / MARKER).write_text("written by python -m fashionrec.demo; the next "
                                        "run replaces this folder\n")

    rows, next_id, ids = [], 10000, {}
    for label, (cat, sub, master, subcat, article) in PRODUCTS.items():
        picks = np.flatnonzero(y_train == label)[: 2 * per_class]
        name = sub.lower()
        for k, i in enumerate(picks[:per_class]):  # the folder layout
            ext, mode = FORMATS[k % len(FORMATS)]
            path = out / "folder" / cat / sub / BRANDS[k % 3] / f"{name}-{k:04d}{ext}"
            _save(product_photo(x_train[i], rng, mode), path)
            ids.setdefault(sub, path.relative_to(out / "folder").as_posix())
        for i in picks[per_class:]:  # the CSV layout: other pictures of the same kinds
            item_id = str(next_id)
            next_id += 1
            _save(product_photo(x_train[i], rng, "RGB"), out / "csv" / "images" / f"{item_id}.jpg")
            n = int(item_id)  # made-up attributes, as a shop's styles.csv has them
            rows.append({"id": item_id, "gender": GENDERS[n % 3], "masterCategory": master,
                         "subCategory": subcat, "articleType": article,
                         "baseColour": COLOURS[(n // 3) % len(COLOURS)],
                         "season": SEASONS[n % 4], "year": 2015 + n % 8,
                         "price": round(15 + (n * 7.3) % 90, 2), "in_stock": n % 5 != 0,
                         "productDisplayName": f"{BRANDS[next_id % 3].title()} {article} {item_id}"})
        for k, i in enumerate(np.flatnonzero(y_test == label)[:n_new]):  # new products
            path = out / "new" / cat / sub / "newbrand" / f"new-{name}-{k}.jpg"
            _save(product_photo(x_test[i], rng, "RGB"), path)
    # Things a real shop folder has: broken files, notes, a class with too few images.
    folder = out / "folder"
    good = (folder / ids["Boots"]).read_bytes()
    (folder / "Footwear/Boots/umbra/boots-broken.jpg").write_bytes(good[: len(good) // 3])
    (folder / "Accessories/Bags/acme/bags-empty.png").write_bytes(b"")
    (folder / "Clothing/README.txt").write_text("photos from the spring shoot\n")
    for k, i in enumerate(np.flatnonzero(y_train == 5)[-2:]):
        _save(product_photo(x_train[i], rng), folder / f"Footwear/Slippers/acme/slippers-{k}.jpg")
    rows.append({**rows[-1], "id": str(next_id), "gender": "Men",
                 "masterCategory": "Footwear", "subCategory": "Shoes", "articleType": "Boots",
                 "productDisplayName": "discontinued, photo lost"})
    (out / "csv/images/10001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(out / "csv" / "styles.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    queries = {}
    for label, stem in ((7, "query-sneaker"), (3, "query-dress")):
        i = np.flatnonzero(y_test == label)[n_new + 5]
        path = out / f"{stem}.png"
        _save(product_photo(x_test[i], rng), path)
        queries[stem] = str(path)
    return {"folder": str(out / "folder"), "csv": str(out / "csv" / "styles.csv"),
            "new": str(out / "new"), "queries": queries, "example_ids": ids,
            "n_folder": len(PRODUCTS) * per_class, "n_csv": len(rows) - 1,
            "n_new": len(PRODUCTS) * n_new}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fashionrec.demo",
                                description="Write a small demo product catalog.")
    p.add_argument("out", help="output folder, e.g. data/demo-catalog")
    p.add_argument("--per-class", type=int, default=60, help="images per class per layout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    args = p.parse_args(argv)
    if args.per_class < 1:
        p.exit(2, "error: --per-class must be >= 1\n")
    try:
        s = make_demo_catalog(args.out, args.per_class, seed=args.seed, data_dir=args.data_dir)
    except (FashionrecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"demo catalog: {s['n_folder']} products in {s['folder']} (+ broken files), "
          f"{s['n_csv']} in {s['csv']}, {s['n_new']} new products in {s['new']}")
    print("example ids: " + ", ".join(list(s["example_ids"].values())[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
