"""fashionrec.images: decoding (formats, pixel budget, JPEG draft), fitting, mirroring,
model batches and gray arrays, on tiny images made here."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from fashionrec import FashionrecError
from fashionrec import images as im

FOREIGN = "not a JPEG, PNG or WebP image, or its header is corrupt"


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def _gradient(w, h):
    """A smooth RGB test picture (JPEG-friendly)."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def _one_line(exc):
    return "\n" not in str(exc.value)


# ---------------------------------------------------------------- formats
def test_every_supported_kind_of_image_decodes_to_rgb(tmp_path):
    made = {
        "rgb.png": Image.new("RGB", (12, 8), (10, 200, 30)),
        "rgb.jpg": Image.new("RGB", (12, 8), (10, 200, 30)),
        "rgb.webp": Image.new("RGB", (12, 8), (10, 200, 30)),
        "gray.png": Image.new("L", (12, 8), 77),
        "rgba.png": Image.new("RGBA", (12, 8), (200, 0, 0, 0)),
        "la.png": Image.new("LA", (12, 8), (0, 0)),
        "deep.png": Image.fromarray(np.full((8, 12), 40000, np.uint16)),
    }
    for name, img in made.items():
        _save(img, tmp_path / name)
    pal = Image.new("P", (12, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 6, 8))
    _save(pal, tmp_path / "pal.png", transparency=0)  # right half transparent
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    for name in [*made, "pal.png"]:
        x = im.read_image(tmp_path / name)
        assert x.shape == (8, 12, 3) and x.dtype == np.uint8, name
    assert (im.read_image(tmp_path / "rgba.png") == 255).all()  # transparent -> white
    assert (im.read_image(tmp_path / "la.png") == 255).all()
    p = im.read_image(tmp_path / "pal.png")
    assert tuple(p[4, 2]) == (255, 0, 0) and tuple(p[4, 9]) == (255, 255, 255)
    assert abs(int(im.read_image(tmp_path / "rgb.jpg")[4, 6, 1]) - 200) < 8
    assert tuple(im.read_image(tmp_path / "gray.png")[0, 0]) == (77, 77, 77)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "white")
    img.paste((0, 0, 0), (0, 0, 10, 20))  # black on the left ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... of a photo whose EXIF says "rotate 90 degrees clockwise"
    img.save(tmp_path / "r.jpg", exif=exif)
    r = im.read_image(tmp_path / "r.jpg")
    assert r.shape == (40, 20, 3) and r[2, 10, 0] < 60 and r[-3, 10, 0] > 200  # black on top


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_in_one_line(tmp_path, fmt):
    path = _save(Image.new("RGB", (8, 8), "red"), tmp_path / f"x.{fmt.lower()}", format=fmt)
    for read in (im.open_image, im.verify_image,
                 lambda p: im.verify_image(p, decode=False),
                 lambda p: im.decode_image(p.read_bytes(), str(p))):
        with pytest.raises(FashionrecError, match=FOREIGN) as exc:
            read(path)
        assert str(path) in str(exc.value) and _one_line(exc)


def test_eps_is_refused_without_pillow_trying_its_plugin(tmp_path, monkeypatch):
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    path = tmp_path / "x.eps"
    path.write_bytes(data)
    Image.init()
    tried = []

    def eps_factory(fp, filename):  # stands in for the EPS plugin (Ghostscript)
        tried.append(filename)
        raise SyntaxError("not really")

    monkeypatch.setitem(Image.OPEN, "EPS", (eps_factory, lambda prefix: True))
    with pytest.raises(FashionrecError, match=FOREIGN) as exc:
        im.open_image(path)
    assert _one_line(exc) and tried == []
    with pytest.raises(FashionrecError, match=FOREIGN):
        im.verify_image(path, decode=False)
    assert tried == []
    with pytest.raises(Exception):  # noqa: B017 - Pillow on its own would try EPS
        Image.open(io.BytesIO(data))
    assert tried


def test_empty_missing_and_truncated_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(FashionrecError, match="empty file"):
        im.open_image(tmp_path / "empty.png")
    with pytest.raises(FashionrecError, match="does not exist"):
        im.open_image(tmp_path / "gone.png")
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(noise).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    with pytest.raises(FashionrecError, match="cannot read image") as exc:
        im.open_image(tmp_path / "cut.jpg")
    assert _one_line(exc)
    im.verify_image(tmp_path / "cut.jpg", decode=False)  # the header alone is fine


# ---------------------------------------------------------------- pixel budget
def test_pixel_budget_is_checked_from_the_header(tmp_path, monkeypatch):
    buf = io.BytesIO()
    Image.new("1", (9400, 9400)).save(buf, "PNG")  # 88 megapixels in a few KB
    assert len(buf.getvalue()) < 100_000
    path = tmp_path / "bomb.png"
    path.write_bytes(buf.getvalue())
    too_big = "9400 x 9400 pixels is more than the limit of 40,000,000"
    for read in (im.open_image, im.verify_image, lambda p: im.verify_image(p, decode=False),
                 lambda p: im.read_image(p, 64),
                 lambda p: im.decode_image(p.read_bytes(), "upload")):
        with pytest.raises(FashionrecError, match=too_big) as exc:
            read(path)
        assert _one_line(exc)
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    with pytest.raises(FashionrecError, match=too_big):
        im.open_image(path)
    assert loads == []  # refused before any decoding
    monkeypatch.undo()
    huge = io.BytesIO()
    Image.new("1", (20000, 10000)).save(huge, "PNG")  # over Pillow's own hard limit too
    with pytest.raises(FashionrecError, match="limit of 40,000,000") as exc:
        im.decode_image(huge.getvalue(), "huge.png")
    assert _one_line(exc)
    # the budget can be raised ...
    assert len(im.verify_image(path, decode=False, max_pixels=100_000_000)) == 64
    # ... and lowered, per call or for the module
    small = _save(Image.new("RGB", (100, 50)), tmp_path / "small.png")
    assert im.open_image(small, max_pixels=5000).size == (100, 50)
    with pytest.raises(FashionrecError, match=r"100 x 50 pixels is more than the limit of 4,999"):
        im.open_image(small, max_pixels=4999)
    with pytest.raises(FashionrecError, match="limit of 4,999"):
        im.decode_image(small.read_bytes(), max_pixels=4999)
    monkeypatch.setattr(im, "MAX_PIXELS", 100)
    with pytest.raises(FashionrecError, match="limit of 100"):
        im.read_image(small)


# ---------------------------------------------------------------- JPEG draft
def test_large_jpeg_decodes_at_reduced_scale(tmp_path, monkeypatch):
    big = _save(_gradient(1024, 768), tmp_path / "big.jpg", quality=95)
    assert im.open_image(big).size == (1024, 768)
    assert im.open_image(big, min_size=64).size == (128, 96)  # 1/8: both sides >= 64
    assert im.open_image(big, min_size=300).size == (512, 384)  # 1/2 (1/4 would be < 300)
    assert im.open_image(big, min_size=600).size == (1024, 768)  # no scale keeps 600
    with Image.open(_save(_gradient(1024, 768), tmp_path / "big.png")) as png:
        assert im.draft(png, 64).size == (1024, 768)  # only JPEGs have a draft mode
    full = {fit: np.asarray(im.fit_square(im.open_image(big), 64, fit), np.int16)
            for fit in ("pad", "crop", "resize")}
    seen = []
    fit_square = im.fit_square
    monkeypatch.setattr(im, "fit_square",
                        lambda img, size, fit="pad": seen.append(img.size)
                        or fit_square(img, size, fit))
    for fit in ("pad", "crop", "resize"):
        x = im.read_image(big, 64, fit)
        assert x.shape == (64, 64, 3)
        assert np.abs(x - full[fit]).mean() < 3  # the same picture
    views = im.ImageFiles([big], 64, views=[("pad", False), ("crop", True)])[0:1]
    assert views.shape == (1, 2, 64, 64, 3)
    assert seen == [(128, 96)] * 5  # every fit saw the 1/8-scale decode


def test_small_images_decode_exactly_as_before(tmp_path):
    path = _save(_gradient(100, 80), tmp_path / "small.jpg")
    with Image.open(path) as img:
        img.load()
        ref = im.fit_square(img.convert("RGB"), 64, "crop")
    assert im.open_image(path, min_size=64).size == (100, 80)
    assert np.array_equal(im.read_image(path, 64, "crop"), np.asarray(ref))


# ---------------------------------------------------------------- fitting, mirroring
def test_fit_square_pads_crops_and_resizes(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    pad, crop, stretch = (np.asarray(im.fit_square(img, 32, f)) for f in ("pad", "crop", "resize"))
    assert pad.shape == crop.shape == stretch.shape == (32, 32, 3)
    assert (pad[0] == 255).all() and (pad[-1] == 255).all() and (pad[16] == 0).all()
    assert (crop == 0).all() and (stretch == 0).all()
    with pytest.raises(FashionrecError, match="fit must be one of"):
        im.fit_square(img, 32, "squash")
    views = im.fit_views(img, 24, ("pad", "crop"))
    assert views.shape == (2, 24, 24, 3) and views.dtype == np.uint8


def test_mirror_views_are_flipped_squares(tmp_path):
    img = Image.new("RGB", (30, 50), "white")
    img.paste((200, 10, 10), (0, 0, 12, 20))
    path = _save(img, tmp_path / "m.png")
    for fit in ("pad", "crop", "resize"):
        plain = im.read_image(path, 32, fit)
        assert np.array_equal(im.read_image(path, 32, fit, mirror=True), np.flip(plain, 1))
    files = im.ImageFiles([path, path], 32, views=[("crop", False), ("crop", True), ("pad", True)])
    batch, failed = files.load(0, 2)
    assert batch.shape == (2, 3, 32, 32, 3) and failed == {}
    assert np.array_equal(batch[0, 1], np.flip(batch[0, 0], 1))
    assert np.array_equal(batch[1, 2], np.flip(im.read_image(path, 32, "pad"), 1))
    assert files.only_views([2]).shape == (2, 1, 32, 32, 3)
    views = im.image_views(Image.open(path), 32, files.views)  # a query, seen as a file
    assert views.shape == (3, 32, 32, 3) and np.array_equal(views, batch[0])


def test_unreadable_file_in_a_batch_is_a_white_placeholder(tmp_path):
    good = _save(Image.new("RGB", (8, 8), "black"), tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"GIF89a nonsense")
    batch, failed = im.ImageFiles([good, tmp_path / "b.png"], 16).load(0, 2)
    assert (batch[0] == 0).all() and (batch[1] == 255).all()
    assert list(failed) == [1] and FOREIGN in failed[1]
    with pytest.raises(FashionrecError, match=FOREIGN):
        im.ImageFiles([good, tmp_path / "b.png"], 16)[0:2]


def test_deep_gray_is_stretched_in_float32_like_float64():
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 65536, (64, 64)).astype(np.uint16),
                rng.integers(1000, 1200, (64, 64)).astype(np.uint16),
                np.full((4, 4), 7, np.uint16),
                rng.normal(0, 3, (32, 32)).astype(np.float32)):
        a = arr.astype(np.float64)
        ref = ((a - a.min()) / max(a.max() - a.min(), 1e-12) * 255).astype(np.uint8)
        got = np.asarray(im._rgb(Image.fromarray(arr)))
        assert got.shape == (*arr.shape, 3)
        if arr.dtype == np.uint16:
            assert np.array_equal(got[..., 0], ref)
        else:
            assert np.abs(got[..., 0].astype(int) - ref).max() <= 1
    deep = np.zeros((30, 30), np.uint16)
    deep[10:20, 10:20] = 60000
    x = np.asarray(im._rgb(Image.fromarray(deep)))
    assert x[15, 15, 0] == 255 and x[0, 0, 0] == 0


# ---------------------------------------------------------------- arrays
def _pil_bilinear(plane, size):
    img = Image.fromarray(plane.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img)


def test_model_batch_resizes_and_makes_rgb():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    x = im.model_batch(gray, 32)
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255
    assert np.array_equal(x[..., 0], x[..., 2])
    np.testing.assert_allclose(x[1, ..., 1], _pil_bilinear(gray[1], (32, 32)), atol=1e-4)
    assert np.array_equal(im.model_batch(gray[..., None], 32), x)
    assert np.array_equal(im.model_batch(gray.astype(np.float32), 32), x)
    rgb = rng.uniform(0, 255, (2, 40, 30, 3)).astype(np.float32)
    y = im.model_batch(rgb, 16)
    assert y.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(y[1, ..., 2], _pil_bilinear(rgb[1, ..., 2], (16, 16)), atol=1e-3)
    same = rng.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    z = im.model_batch(same, 16)
    assert np.array_equal(z, same) and not np.shares_memory(z, same)  # a new array
    with pytest.raises(FashionrecError, match="images must be"):
        im.model_batch(np.zeros((2, 28)), 32)
    with pytest.raises(FashionrecError, match="images must be"):
        im.model_batch(np.zeros((2, 8, 8, 4)), 32)


def test_gray_arrays_from_arrays_files_and_pil(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (50, 40, 3)).astype(np.uint8)
    g = im.to_gray(rgb, (28, 28))
    assert g.shape == (28, 28) and g.dtype == np.float32 and 0 <= g.min() <= g.max() <= 255
    plain = rng.uniform(0, 255, (28, 28)).astype(np.float32)
    assert np.array_equal(im.to_gray(plain[..., None], (28, 28)), plain)  # no resize
    lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(g, np.clip(_pil_bilinear(lum, (28, 28)), 0, 255), atol=1e-3)
    assert im.to_gray(np.full((10, 10), 400.0), (5, 7)).max() == 255  # clipped
    assert im.to_gray(np.zeros((10, 10)), (5, 7)).shape == (5, 7)
    with pytest.raises(FashionrecError, match="NaN"):
        im.to_gray(np.full((4, 4), np.nan), (28, 28))
    with pytest.raises(FashionrecError, match="must be"):
        im.to_gray(np.zeros((2, 3, 5)), (28, 28))
    path = _save(Image.fromarray(rgb), tmp_path / "g.png")
    f = im.load_image(path, (28, 28))
    assert f.shape == (28, 28) and f.dtype == np.float32 and f.max() <= 255
    assert np.array_equal(f, im.gray_from_pil(Image.open(path), (28, 28)))
