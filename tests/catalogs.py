"""Tiny synthetic product catalogs, generated inside the tests.

Each class is a shape in a colour, drawn with jitter on white at odd sizes; some
images are gray, some RGBA with a transparent background, some WebP; a few files
are corrupt (truncated JPEG, random bytes, empty) or not images at all.
"""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image, ImageDraw

# folder path -> (shape, colour)
CLASSES = {
    "Shoes/Boots": ("rectangle", (120, 60, 20)),
    "Shoes/Sandals": ("ellipse", (200, 40, 40)),
    "Bags/Totes": ("triangle", (30, 90, 200)),
}
SIZES = [(64, 64), (37, 53), (120, 80), (50, 90), (200, 150)]


def draw_product(shape, colour, rng, size=(64, 64), mode="RGB"):
    """One synthetic product photo: a jittered shape on white."""
    w, h = size
    img = Image.new("RGBA", size, (255, 255, 255, 0 if mode == "RGBA" else 255))
    d = ImageDraw.Draw(img)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    rx, ry = w * rng.uniform(0.2, 0.35), h * rng.uniform(0.2, 0.35)
    jitter = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    if shape == "rectangle":
        d.rectangle(box, fill=(*jitter, 255))
    elif shape == "ellipse":
        d.ellipse(box, fill=(*jitter, 255))
    else:
        d.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=(*jitter, 255))
    if mode == "RGBA":
        return img
    return img.convert(mode)


def _save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)


def make_folder_catalog(root, n_per_class=8, seed=0):
    """``root/<Category>/<Sub>/<brand>/<n>.<ext>``; returns what a reader should find."""
    rng = np.random.default_rng(seed)
    good = []
    for cls, (shape, colour) in CLASSES.items():
        for k in range(n_per_class):
            mode, ext = ("L", ".png") if k % 4 == 1 else ("RGBA", ".png") if k % 4 == 2 else (
                ("RGB", ".webp") if k % 4 == 3 else ("RGB", ".jpg"))
            brand = f"brand{k % 2}"
            path = root / cls / brand / f"{k:03d}{ext}"
            _save(draw_product(shape, colour, rng, SIZES[k % len(SIZES)], mode), path)
            good.append(path.relative_to(root).as_posix())
    # broken things
    bad = {}
    boots = root / "Shoes/Boots/brand0"
    jpg = (boots / "000.jpg").read_bytes()
    (boots / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    bad["Shoes/Boots/brand0/truncated.jpg"] = "unreadable image"
    (boots / "noise.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    bad["Shoes/Boots/brand0/noise.png"] = "unreadable image"
    (root / "Bags/Totes/empty.webp").write_bytes(b"")
    bad["Bags/Totes/empty.webp"] = "unreadable image"
    (root / "Bags/notes.txt").write_text("not an image")
    bad["Bags/notes.txt"] = "not an image file"
    _save(draw_product("ellipse", (0, 0, 0), rng), root / "loose.jpg")
    bad["loose.jpg"] = "no class folder"
    # a class with too few images
    for k in range(2):
        _save(draw_product("ellipse", (0, 200, 0), rng), root / f"Hats/Caps/{k}.jpg")
        bad[f"Hats/Caps/{k}.jpg"] = "class too small"
    (root / ".hidden").mkdir()
    (root / ".hidden/x.jpg").write_bytes(jpg)  # hidden: ignored entirely
    return good, bad


def make_csv_catalog(root, n_per_class=8, seed=1):
    """``root/styles.csv`` (id, articleType, masterCategory, ...) beside ``root/images``."""
    rng = np.random.default_rng(seed)
    rows, good, bad = [], [], {}
    next_id = 1000
    for cls, (shape, colour) in CLASSES.items():
        master, article = cls.split("/")
        for k in range(n_per_class):
            item_id = str(next_id)
            next_id += 1
            mode = "L" if k % 3 == 1 else "RGB"
            _save(draw_product(shape, colour, rng, SIZES[k % len(SIZES)], mode),
                  root / "images" / f"{item_id}.jpg")
            rows.append({"id": item_id, "masterCategory": master, "articleType": article,
                         "productDisplayName": f"{article}, no. {k}"})
            good.append(item_id)
    rows.append({"id": "2000", "masterCategory": "Shoes", "articleType": "Boots",
                 "productDisplayName": "no image file"})
    bad["2000"] = "image file missing"
    rows.append({"id": "2001", "masterCategory": "Shoes", "articleType": "",
                 "productDisplayName": "no label"})
    _save(draw_product("ellipse", (0, 0, 0), rng), root / "images/2001.jpg")
    bad["2001"] = "no label"
    rows.append(dict(rows[0], productDisplayName="duplicate"))
    bad["dup"] = "duplicate id"
    (root / "images/2002.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows.append({"id": "2002", "masterCategory": "Bags", "articleType": "Totes",
                 "productDisplayName": "corrupt"})
    bad["2002"] = "unreadable image"
    with open(root / "styles.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return good, bad


def make_split_catalog(root, counts=None, val_name="validation", seed=2):
    """``root/<split>/<Category>/<n>.jpg`` in ``train/``, ``val_name/`` and ``test/``
    (the layout of clothing-dataset-small); returns ``{split: [ids]}``."""
    counts = counts or {"train": 8, val_name: 3, "test": 3}
    rng = np.random.default_rng(seed)
    ids = {}
    for split, n in counts.items():
        for cls, (shape, colour) in CLASSES.items():
            top = cls.split("/")[1]  # Boots, Sandals, Totes
            for k in range(n):
                path = root / split / top / f"{split}-{k:02d}.jpg"
                _save(draw_product(shape, colour, rng, SIZES[k % len(SIZES)]), path)
                ids.setdefault(split, []).append(path.relative_to(root).as_posix())
    return ids


GENDERS = ("Women", "Men")
COLOURS = ("Red", "Pink", "Blue", "Black")
SEASONS = ("Summer", "Winter", "Fall")
USAGES = ("Casual", "Formal")
# the schema the CSV below must give (its columns' values, read by a person)
EXPECTED_SCHEMA = {"gender": "string", "baseColour": "string", "season": "string",
                   "year": "integer", "usage": "string", "price": "float",
                   "in_stock": "boolean", "name": "string"}


def make_styles(root, n_per_class=10, seed=3):
    """``root/styles.csv`` (id, articleType, gender, baseColour, season, year, usage,
    price, in_stock, name) beside ``root/images/<id>.jpg``; returns the rows."""
    rng = np.random.default_rng(seed)
    rows, next_id = [], 100
    for cls, (shape, colour) in CLASSES.items():
        for k in range(n_per_class):
            item_id = str(next_id)
            next_id += 1
            path = root / "images" / f"{item_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_product(shape, colour, rng, (48, 48)).save(path, quality=90)
            rows.append({"id": item_id, "articleType": cls.split("/")[1],
                         "gender": GENDERS[k % 2], "baseColour": COLOURS[k % 4],
                         "season": SEASONS[k % 3], "year": str(2010 + k),
                         "usage": USAGES[(k // 2) % 2],
                         # one price missing: an empty cell is a missing value
                         "price": "" if k == 9 else f"{20 + 7.5 * k:.2f}",
                         "in_stock": "true" if k % 3 else "false",
                         "name": f"{cls.split('/')[1]} no. {k}"})
    with open(root / "styles.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def matches(row, gender=None, max_price=None, colours=None):
    """The test's own reading of a filter, on the CSV's text."""
    if gender is not None and row["gender"] != gender:
        return False
    if max_price is not None and not (row["price"] and float(row["price"]) < max_price):
        return False
    return colours is None or row["baseColour"] in colours
