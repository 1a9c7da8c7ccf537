"""Images: the one place the package decodes, orients, fits, mirrors, resizes and
converts pixels.

Only JPEG, PNG and WebP files are opened (Pillow never tries another format's
plugin), and an image whose header says it has more than :data:`MAX_PIXELS` pixels
is refused before it is decoded. Where the square the image is fitted to is known, a
large JPEG is decoded at 1/2, 1/4 or 1/8 scale (never below that square), so a 24 MP
photo costs a fraction of its full decode. Every failure is a one-line
:class:`~fashionrec.errors.FashionrecError` naming the file.

Three kinds of output:

* RGB uint8 squares for the backbone and for display (:func:`read_image`,
  :class:`ImageFiles`, :func:`image_views`, :func:`fit_views`): transparency
  composited on white, fitted by letterbox, centre crop or stretch
  (:func:`fit_square`), mirrored on request;
* the backbone's float32 batch (:func:`model_batch`): resized, gray made RGB;
* gray float32 arrays for gray (Fashion-MNIST) models (:func:`to_gray`,
  :func:`load_image`, :func:`gray_from_pil`).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from .config import FITS
from .errors import FashionrecError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FORMATS = ("JPEG", "PNG", "WEBP")  # the only Pillow formats ever opened
MAX_PIXELS = 40_000_000  # width x height allowed, checked from the header
BACKGROUND = (255, 255, 255)  # product photos sit on white: transparency and padding
_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # 16/32-bit integer or float gray


# ---------------------------------------------------------------- decoding
def _open(data, name, max_pixels=None):
    """``data`` opened from its header only: a JPEG, PNG or WebP image with at least one
    pixel and no more than the pixel budget."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise FashionrecError(f"cannot read image {name} (empty file)")
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise FashionrecError(f"cannot read image {name} (not a JPEG, PNG or WebP image, "
                              f"or its header is corrupt)") from None
    except Image.DecompressionBombError:  # over Pillow's own hard limit, before ours
        raise FashionrecError(f"cannot read image {name} (more pixels than the limit of "
                              f"{min(limit, 2 * (Image.MAX_IMAGE_PIXELS or 0)):,})") from None
    except Exception as exc:  # PIL raises many types for bad files
        raise _failed(name, exc) from None
    w, h = img.size
    if w * h > limit:
        raise FashionrecError(f"cannot read image {name} ({w} x {h} pixels is more than "
                              f"the limit of {limit:,})")
    if min(img.size) < 1:
        raise FashionrecError(f"cannot read image {name} (empty image)")
    return img


def _failed(name, exc):
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return FashionrecError(f"cannot read image {name} ({msg})")


def draft(img, min_size):
    """Let an opened, not yet loaded JPEG decode at the smallest 1/2, 1/4 or 1/8 scale
    whose sides both stay at least ``min_size``; other images (and ``None``) are left
    as they are. Returns ``img``."""
    if min_size and img.format == "JPEG" and min(img.size) >= 2 * int(min_size):
        img.draft("RGB", (int(min_size), int(min_size)))  # mode unchanged: scale only
    return img


def _decode(data, name, max_pixels=None, min_size=None):
    """A fully decoded PIL image from bytes, EXIF rotation applied; any failure is a
    FashionrecError."""
    from PIL import ImageOps

    img = _open(data, name, max_pixels)
    try:
        draft(img, min_size)
        img.load()  # decodes everything: a truncated file fails here
        if img.getexif().get(0x0112, 1) in range(2, 9):  # EXIF orientation
            img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise _failed(name, exc) from None
    return img


def _read_bytes(path):
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FashionrecError(f"image {path} does not exist") from None
    except OSError as exc:
        raise FashionrecError(f"cannot read image {path} ({exc.strerror or exc})") from None


def check_header(data, name="image", max_pixels=None):
    """Raise the one-line error :func:`decode_image` would for what ``data``'s header
    says (not a JPEG, PNG or WebP image; more pixels than ``max_pixels``), without
    decoding a pixel."""
    _open(data, name, max_pixels).close()


def decode_image(data, name="image", max_pixels=None, min_size=None):
    """Image bytes (an upload) fully decoded like a file by :func:`open_image`; ``name``
    is how errors refer to it."""
    return _decode(data, name, max_pixels, min_size)


def open_image(path, max_pixels=None, min_size=None):
    """An image file fully decoded (PIL), EXIF rotation applied; a missing, empty,
    truncated, foreign (not JPEG, PNG or WebP) or too large file is a one-line
    :class:`FashionrecError`.

    Args:
        max_pixels: width x height allowed (default :data:`MAX_PIXELS`), checked from
            the header before decoding.
        min_size: side of the square the image will be fitted to: a large JPEG is
            decoded at reduced scale, both sides still at least ``min_size``.
    """
    return _decode(_read_bytes(path), path, max_pixels, min_size)


def verify_image(path, decode=True, max_pixels=None):
    """Read and decode ``path`` (with ``decode=False``: only identify its format and size
    from the header); return its SHA-256, or raise a one-line error."""
    data = _read_bytes(path)
    if decode:
        _decode(data, path, max_pixels)
    else:
        _open(data, path, max_pixels).close()
    return hashlib.sha256(data).hexdigest()


def read_image(path, size=None, fit="pad", mirror=False, max_pixels=None):
    """An image file as RGB uint8: transparency composited on white; with ``size``,
    fitted to a ``size`` x ``size`` square (:func:`fit_square`; a large JPEG is decoded
    at reduced scale), mirrored left-right with ``mirror``."""
    return _to_rgb(open_image(path, max_pixels, size), size, fit, mirror)


def image_from_array(image, size=None):
    """An image array (``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``, values
    0-255) prepared exactly like an image file by :func:`read_image`."""
    return _to_rgb(pil_from_array(image), size)


def pil_from_array(image):
    """An image array (as for :func:`image_from_array`) as a PIL image; a bad shape or
    NaN values are a one-line :class:`FashionrecError`."""
    from PIL import Image

    x = np.asarray(image)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (3, 4))) or min(x.shape[:2]) < 1:
        raise FashionrecError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or "
                              f"(H, W, 4), got {np.shape(image)}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise FashionrecError("the image array has NaN or infinite values")
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- RGB squares
def fit_views(img, size, fits):
    """A decoded PIL image fitted to the square once per way in ``fits``:
    ``(len(fits), size, size, 3)`` uint8. (Decode it with ``min_size=size`` so a large
    JPEG is read as :class:`ImageFiles` reads it.)"""
    rgb = _rgb(img)
    return np.stack([_fit_rgb(rgb, size, fit) for fit in fits])


def image_views(img, size, views, out=None):
    """A decoded PIL image seen in every ``(fit, mirror)`` of ``views``:
    ``(len(views), size, size, 3)`` uint8 (written into ``out`` where given), as
    :class:`ImageFiles` reads a file. (Decode it with ``min_size=size`` so a large JPEG
    is read at the same reduced scale.)"""
    rgb = _rgb(img)
    # a mirror view is its fitted square flipped (ImageOps.mirror's very pixels), so
    # each fit is resized once however many views use it
    fitted = {f: _fit_rgb(rgb, size, f) for f in dict.fromkeys(f for f, _ in views)}
    out = np.empty((len(views), size, size, 3), np.uint8) if out is None else out
    for v, (f, m) in enumerate(views):
        out[v] = fitted[f][:, ::-1] if m else fitted[f]
    return out


def fit_square(img, size, fit="pad"):
    """A PIL image fitted to ``size`` x ``size``: ``"pad"`` letterboxes it on white (the
    whole product, no distortion), ``"crop"`` takes the largest centred square (no
    padding, the edges of a long side are lost), ``"resize"`` stretches it."""
    from PIL import Image, ImageOps

    if fit == "pad":
        return ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR,
                            color=BACKGROUND)
    if fit == "crop":
        return ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    if fit == "resize":
        return img.resize((size, size), Image.Resampling.BILINEAR)
    raise FashionrecError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")


def _to_rgb(img, size, fit="pad", mirror=False):
    return _fit_rgb(_rgb(img), size, fit, mirror)


def _rgb(img):
    """A decoded PIL image as RGB: transparency composited on white, 16-bit or float
    gray stretched to 0-255."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        img.alpha_composite(rgba)
    if img.mode in _GRAY_MODES:
        img = Image.fromarray(_stretch(np.asarray(img)))
    return img if img.mode == "RGB" else img.convert("RGB")


def _stretch(arr):
    """Gray values stretched to 0-255 uint8 (min -> 0, max -> 255), in one float32 copy
    changed in place (exact for 16-bit values)."""
    x = arr.astype(np.float32)
    lo = x.min()
    span = max(float(x.max()) - float(lo), 1e-12)
    x -= lo
    x *= 255
    x /= span
    return x.astype(np.uint8)


def _fit_rgb(rgb, size, fit="pad", mirror=False):
    from PIL import ImageOps

    img = rgb if size is None else fit_square(rgb, size, fit)
    if mirror:
        img = ImageOps.mirror(img)
    return np.asarray(img, dtype=np.uint8)


class ImageFiles:
    """A list of image files that reads like an ``(N, size, size, 3)`` uint8 array:
    slicing decodes just those files, so extraction streams from disk. ``fit`` and
    ``mirror`` are as for :func:`read_image`.

    With ``views`` (a list of ``(fit, mirror)``), each file is decoded once and seen in
    every view: items are ``(len(views), size, size, 3)``. :meth:`load` is how the
    extractor reads: a file that cannot be decoded becomes a white placeholder and is
    reported with its row instead of stopping the whole extraction."""

    def __init__(self, paths, size, fit="pad", mirror=False, views=None):
        self.paths = list(paths)
        self.size = int(size)
        self.fit = fit
        self.mirror = bool(mirror)
        self.views = None if views is None else [(f, bool(m)) for f, m in views]

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self):
        view = (len(self.views),) if self.views is not None else ()
        return (len(self), *view, self.size, self.size, 3)

    def only_views(self, positions):
        """The same files seen in the views at ``positions`` only."""
        return ImageFiles(self.paths, self.size, self.fit, self.mirror,
                          [self.views[p] for p in positions])

    def _read(self, path, out=None):
        """One file's item, written into ``out`` (a row of the batch) where given."""
        if self.views is None:
            img = read_image(path, self.size, self.fit, self.mirror)
            if out is None:
                return img
            out[...] = img
            return out
        return image_views(open_image(path, min_size=self.size), self.size, self.views, out)

    def __getitem__(self, key):
        if not isinstance(key, slice):
            return self._read(self.paths[key])
        out, failed = self.load(*key.indices(len(self))[:2])
        if failed:
            raise FashionrecError(next(iter(failed.values())))
        return out

    def load(self, start, stop):
        """Rows ``start:stop`` decoded: ``(images, failed)``, ``failed`` mapping the row
        of each unreadable file to the one-line reason (its image is left white)."""
        paths = self.paths[start:stop]
        out = np.full((len(paths), *self.shape[1:]), 255, np.uint8)
        failed = {}
        for i, path in enumerate(paths):
            try:
                self._read(path, out[i])
            except FashionrecError as exc:
                out[i] = 255
                failed[start + i] = str(exc)
        return out, failed


# ---------------------------------------------------------------- resizing arrays
def _resize_plane(plane, shape):
    """A 2-D float32 array resized to ``shape`` (rows, columns) with Pillow's bilinear
    filter on float values (mode ``F``: no rounding to uint8)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))  # mode "F"
    img = img.resize((int(shape[1]), int(shape[0])), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def model_batch(images, image_size):
    """A batch of images (``(N, H, W)``, ``(N, H, W, 1)`` or ``(N, H, W, 3)``, values
    0-255, RGB) as the backbone's input before preprocessing: a new float32
    ``(N, S, S, 3)`` array, each image resized to ``S`` x ``S`` (Pillow bilinear) and
    gray repeated to RGB."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise FashionrecError(f"images must be (N, H, W[, 1 or 3]), got {np.shape(images)}")
    size = int(image_size)
    if x.shape[1:3] != (size, size):
        out = np.empty((len(x), size, size, x.shape[-1]), np.float32)
        for i in range(len(x)):
            for c in range(x.shape[-1]):
                out[i, :, :, c] = _resize_plane(x[i, :, :, c], (size, size))
        x = out
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif isinstance(images, np.ndarray) and np.may_share_memory(x, images):
        x = x.copy()  # the caller's own float32 array: never handed back to be changed
    return x


# ---------------------------------------------------------------- gray arrays
def to_gray(image, shape):
    """An image array as ``shape``-sized gray uint8-range float32 (resized with Pillow's
    bilinear filter)."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 3 and x.shape[-1] in (3, 4):
        x = x[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if x.ndim != 2 or min(x.shape) < 1:
        raise FashionrecError(f"an image array must be (H, W), (H, W, 1) or (H, W, 3), "
                              f"got {np.shape(image)}")
    if not np.isfinite(x).all():
        raise FashionrecError("the image array has NaN or infinite values")
    if tuple(x.shape) != tuple(shape):
        x = _resize_plane(x, shape)
    return np.clip(x, 0, 255)


def load_image(path, shape):
    """Read an image file as gray ``shape``-sized array (values 0-255), read and
    checked like a catalog image (:func:`open_image`)."""
    return gray_from_pil(open_image(path), shape)


def gray_from_pil(img, shape):
    """A decoded PIL image as a gray ``shape``-sized float32 array (values 0-255)."""
    from PIL import Image

    img = img.convert("L").resize(tuple(reversed(shape)), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)
