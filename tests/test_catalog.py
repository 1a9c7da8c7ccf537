import numpy as np
import pytest
from catalogs import CLASSES, make_csv_catalog, make_folder_catalog
from PIL import Image

from fashionrec import FashionrecError
from fashionrec.catalog import Catalog, category_matches, image_from_array, read_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop") / "folder"
    good, bad = make_folder_catalog(root)
    return root, good, bad


@pytest.fixture(scope="module")
def csv_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    good, bad = make_csv_catalog(root)
    return root, good, bad


def test_folder_layout_classes_ids_and_categories(folder):
    root, good, bad = folder
    cat = Catalog.read(root)  # class = first folder level by default
    assert set(cat.labels) == {"Shoes", "Bags", "Hats"}
    two = Catalog.from_folder(root, label_depth=2)
    assert set(two.labels) == set(CLASSES) | {"Hats/Caps"}
    i = two.ids.index("Shoes/Boots/brand1/001.png")
    assert two.labels[i] == "Shoes/Boots" and two.categories[i] == "Shoes/Boots/brand1"
    assert two.paths[i] == (root / "Shoes/Boots/brand1/001.png").resolve()
    assert not any(".hidden" in i for i in two.ids)


def test_folder_check_skips_and_reports_every_bad_file(folder):
    root, good, bad = folder
    clean, report = Catalog.from_folder(root, label_depth=2).check(min_class_size=5,
                                                                   progress=False)
    assert sorted(clean.ids) == sorted(good)
    assert {s["id"]: s["kind"] for s in report["skipped"]} == bad
    assert report["n_ok"] == len(good) and report["n_skipped"] == len(bad)
    assert report["n_listed"] == len(good) + len(bad)
    assert report["small_classes"] == {"Hats/Caps": 2}
    assert report["class_counts"] == {c: 8 for c in sorted(CLASSES)}
    assert report["skipped_by_kind"]["unreadable image"] == 3
    assert all(len(d) == 64 for d in clean.sha256)
    # min_class_size 1 keeps the small class
    clean1, report1 = Catalog.from_folder(root, label_depth=2).check(1, progress=False)
    assert len(clean1) == len(good) + 2 and not report1["small_classes"]


def test_csv_layout_with_kaggle_like_columns(csv_catalog):
    root, good, bad = csv_catalog
    cat = Catalog.read(root / "styles.csv", label_column="articleType",
                       category_columns="masterCategory,articleType")
    clean, report = cat.check(progress=False)
    assert clean.ids == good
    kinds = {s["id"]: s["kind"] for s in report["skipped"]}
    assert kinds == {"2000": "image file missing", "2001": "no label", "1000": "duplicate id",
                     "2002": "unreadable image"}
    assert set(clean.labels) == {"Boots", "Sandals", "Totes"}
    assert clean.categories[0] == "Shoes/Boots"
    assert cat.source["label_column"] == "articleType"


def test_csv_image_column_instead_of_a_pattern(tmp_path):
    Image.new("RGB", (20, 30), "red").save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("sku,kind,file\nA1,hat,a.png\nA2,hat,missing.png\n")
    cat = Catalog.from_csv(tmp_path / "m.csv", label_column="kind", id_column="sku",
                           image_column="file")
    assert cat.ids == ["A1"] and cat.skipped[0]["kind"] == "image file missing"


def test_csv_errors_are_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("id,colour\n1,red\n")
    with pytest.raises(FashionrecError, match="no column 'label'.*columns are id, colour"):
        Catalog.read(tmp_path / "m.csv")
    with pytest.raises(FashionrecError, match="does not exist"):
        Catalog.read(tmp_path / "nope")
    with pytest.raises(FashionrecError, match="neither a folder"):
        (tmp_path / "x.txt").write_text("")
        Catalog.read(tmp_path / "x.txt")
    with pytest.raises(FashionrecError, match=r"must contain \{id\}"):
        Catalog.from_csv(tmp_path / "m.csv", label_column="colour", image_pattern="x.jpg")


def test_images_of_any_mode_become_padded_rgb(tmp_path):
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (10, 5, 30, 15))
    rgba.save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png", 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    assert tuple(x[0, 0]) == (255, 255, 255)  # transparent -> white, padding white
    assert x[16, 16, 0] > 150 and x[16, 16, 1] < 80  # the red product, centred
    Image.new("L", (9, 50), 30).save(tmp_path / "g.webp")
    g = read_image(tmp_path / "g.webp", 32)
    assert g.shape == (32, 32, 3) and (g[16, 16] == g[16, 16, 0]).all()
    deep = np.zeros((30, 30), np.uint16)
    deep[10:20, 10:20] = 60000  # a 16-bit gray PNG: bright square on black
    Image.fromarray(deep).save(tmp_path / "d.png")
    d = read_image(tmp_path / "d.png", 30)
    assert d.shape == (30, 30, 3) and d[15, 15, 0] == 255 and d[0, 0, 0] == 0
    tall = Image.new("RGB", (40, 20), "white")
    tall.paste((0, 0, 0), (0, 0, 10, 20))  # black on the left ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... of a photo whose EXIF says "rotate 90° clockwise to view"
    tall.save(tmp_path / "r.jpg", exif=exif)
    r = read_image(tmp_path / "r.jpg")
    assert r.shape == (40, 20, 3) and r[2, 10, 0] < 60 and r[-3, 10, 0] > 200  # black on top
    assert np.array_equal(image_from_array(np.asarray(Image.open(tmp_path / "a.png")), 32), x)
    with pytest.raises(FashionrecError, match="must be"):
        image_from_array(np.zeros((2, 3, 5)), 32)


def test_lazy_image_sequence_decodes_batches(folder):
    root, good, _ = folder
    clean, _ = Catalog.from_folder(root, 2).check(5, progress=False)
    images = clean.images(24)
    assert images.shape == (len(good), 24, 24, 3)
    batch = images[3:7]
    assert batch.shape == (4, 24, 24, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch[1], images[4])
    assert images[len(good):].shape == (0, 24, 24, 3)


def test_content_digest_changes_with_a_file(tmp_path):
    (tmp_path / "c").mkdir()
    for k in range(2):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / f"c/{k}.png")
    a = Catalog.from_folder(tmp_path).check(progress=False)[0].content_digest()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "c/1.png")
    b = Catalog.from_folder(tmp_path).check(progress=False)[0].content_digest()
    assert a != b
    with pytest.raises(FashionrecError, match="call check"):
        Catalog.from_folder(tmp_path).content_digest()


def test_category_matching_is_by_whole_levels():
    cats = ["Shoes/Boots/Acme", "Shoes/Bootsy", "Bags/Totes", "boots"]
    assert category_matches(cats, "Boots").tolist() == [True, False, False, True]
    assert category_matches(cats, "shoes/boots").tolist() == [True, False, False, False]
    assert category_matches(cats, "Shoes").tolist() == [True, True, False, False]
    with pytest.raises(FashionrecError, match="empty category"):
        category_matches(cats, " / ")
