"""The image route's display cache (encoded once per file, re-read when the file
changes, bounded in bytes) and the category filter matched once per distinct path."""

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from fashionrec import CatalogIndex
from fashionrec.catalog import category_matches
from fashionrec.queries import category_mask
from fashionrec.results import Item

pytest.importorskip("fastapi")
from fashionrec.serve.pictures import DisplayCache  # noqa: E402


class Shop:
    """A served run as the cache sees it: items with a picture file, decoded (and
    counted) by ``item_image``."""

    run_id_ = "run-1"

    def __init__(self, folder, n=3):
        self.paths = {}
        for i in range(n):
            path = folder / f"{i}.png"
            Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(path)
            self.paths[str(i)] = str(path)
        self.decoded = []

    def item(self, item_id):
        return Item(0, item_id, 0, "shirt", 0.0, path=self.paths[item_id])

    def item_image(self, item_id):
        self.decoded.append(item_id)
        return np.asarray(Image.open(self.paths[item_id]).convert("RGB"))


def test_a_picture_is_decoded_once_and_again_when_its_file_changes(tmp_path):
    shop, cache = Shop(tmp_path), DisplayCache(1 << 20)
    first = cache.picture(shop, "1")
    assert cache.picture(shop, "1") == first and shop.decoded == ["1"]
    assert Image.open(io.BytesIO(first)).getpixel((0, 0)) == (60, 0, 0)
    time.sleep(0.01)
    Image.new("RGB", (40, 30), (0, 200, 0)).save(shop.paths["1"])
    os.utime(shop.paths["1"], ns=(time.time_ns(), time.time_ns()))
    changed = cache.picture(shop, "1")
    assert shop.decoded == ["1", "1"]
    assert Image.open(io.BytesIO(changed)).getpixel((0, 0)) == (0, 200, 0)


def test_the_cache_is_bounded_in_bytes_and_a_missing_file_is_none(tmp_path):
    shop = Shop(tmp_path)
    one = len(DisplayCache(1 << 20).picture(shop, "0"))
    cache = DisplayCache(2 * one + one // 2)  # room for two pictures
    for item_id in ["0", "1", "2", "0"]:
        cache.picture(shop, item_id)
    assert shop.decoded == ["0", "0", "1", "2", "0"]  # "0" was evicted first
    assert cache._bytes <= cache.max_bytes
    os.remove(shop.paths["2"])
    assert cache.picture(shop, "2") is None
    off = DisplayCache(0)
    off.picture(shop, "1")
    off.picture(shop, "1")
    assert shop.decoded[-2:] == ["1", "1"]  # 0 bytes: nothing kept


def test_category_mask_equals_matching_each_item():
    rng = np.random.default_rng(0)
    paths = ["Shoes/Boots/Acme", "Shoes/Sandals", "Bags", "", "Shoes/Boots/Zed"]
    cats = [paths[i] for i in rng.integers(0, len(paths), 500)]
    index = CatalogIndex(rng.normal(size=(500, 4)).astype(np.float32), list(range(500)),
                         rng.integers(0, 2, 500), ["boots", "bags"], None,
                         categories=cats)
    every = index.all_categories()
    for wanted in ["Boots", "shoes/boots", "Shoes", "bags", "Acme", "boots/acme", "nothing"]:
        loop = np.array([category_matches([c], wanted)[0] for c in every])
        assert np.array_equal(category_mask(index, wanted), loop), wanted
    empty = CatalogIndex(np.zeros((0, 4), np.float32), [], [], ["boots"], None)
    assert category_mask(empty, "Boots").shape == (0,)
