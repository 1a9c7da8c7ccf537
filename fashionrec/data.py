"""Stage 1 — data: the official IDX files of Fashion-MNIST (or MNIST), found locally
or downloaded, checked against their published SHA-256, parsed into arrays."""

from __future__ import annotations

import gzip
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import sha256_file, short_reason
from .config import project_roots, shared_dirs
from .errors import FashionrecError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    subdir: str  # folder name used by Keras's cache, data/ and ../shared/datasets
    base_url: str
    sha256: dict  # file name -> published SHA-256
    class_names: tuple
    n_test: int = 10000  # images in the test split


SPECS = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        subdir="fashion-mnist",
        base_url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        sha256={
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
    "mnist": DatasetSpec(
        name="mnist",
        subdir="mnist",
        base_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
        sha256={
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        class_names=tuple(str(d) for d in range(10)),
    ),
}

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_DTYPES = {0x08: np.uint8}


@dataclass
class Dataset:
    """Images ``(N, 28, 28) uint8`` and integer labels for both splits."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    source: str = ""


def get_spec(name):
    try:
        return SPECS[name]
    except KeyError:
        raise FashionrecError(
            f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}"
        ) from None


def read_idx(path):
    """Parse one gzipped IDX file (``magic, dims..., data``) into a NumPy array.

    Raises :class:`FashionrecError` for a file that is not gzip, has a foreign
    magic number, or is shorter or longer than its header says.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise FashionrecError(f"{path} is not a readable gzip IDX file ({exc})") from None
    if len(raw) < 4:
        raise FashionrecError(f"{path} is too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise FashionrecError(f"{path} has no IDX header (magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FashionrecError(f"{path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[dtype_code]
    expected = int(np.prod(dims)) * np.dtype(dtype).itemsize
    if len(raw) - header != expected:
        raise FashionrecError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} needs "
            f"{expected}: the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def candidate_dirs(name, data_dir=None):
    """Folders searched, in order, for a dataset's four IDX files."""
    spec = get_spec(name)
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / spec.subdir]
    dirs += [root / "data" / spec.subdir for root in project_roots()]
    dirs.append(_keras_cache() / "datasets" / spec.subdir)
    dirs += [s / "datasets" / spec.subdir for s in shared_dirs()]
    return list(dict.fromkeys(dirs))  # first occurrence of each, in order


def _keras_cache():
    """Keras's cache folder (``$KERAS_HOME`` or ``~/.keras``), as ``get_file`` uses it."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def locate(name, data_dir=None, download=True):
    """The first folder holding all four files of ``name``; downloads them into
    Keras's cache (SHA-256 checked) if none does and ``download`` is true."""
    spec = get_spec(name)
    tried = candidate_dirs(name, data_dir)
    for d in tried:
        if all((d / f).is_file() for f in spec.sha256):
            return d
    if not download:
        raise FashionrecError(
            f"{name} IDX files not found in: {', '.join(map(str, tried))}"
        )
    return _download(spec, tried)


def _download(spec, tried):
    from keras.utils import get_file

    target = None
    _keras_cache().mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        for fname, digest in spec.sha256.items():
            target = get_file(
                fname,
                origin=spec.base_url + fname,
                file_hash=digest,
                cache_dir=str(_keras_cache()),
                cache_subdir=f"datasets/{spec.subdir}",
            )
    except Exception as exc:  # network errors come in many types
        raise FashionrecError(
            f"{spec.name} not found locally (looked in {', '.join(map(str, tried))}) and "
            f"the download from {spec.base_url} failed ({short_reason(exc)}); "
            f"put the four IDX .gz files in one of those folders or pass --data-dir"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return Path(target).parent


def load_split(name, split, data_dir=None, verify=True, download=True):
    """``(images, labels, folder)`` of one split (``"train"`` or ``"test"``).

    With ``verify`` the files' SHA-256 must match the published ones, so a
    corrupt, truncated or foreign file stops the run with a clear message.
    """
    spec = get_spec(name)
    if split not in SPLIT_FILES:
        raise FashionrecError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder = locate(name, data_dir, download)
    arrays = []
    for fname in SPLIT_FILES[split]:
        path = folder / fname
        if verify:
            digest = sha256_file(path)
            if digest != spec.sha256[fname]:
                raise FashionrecError(
                    f"{path}: SHA-256 {digest[:12]}… is not the published "
                    f"{spec.sha256[fname][:12]}… of {spec.name}; the file is corrupt, "
                    f"truncated or from another dataset: replace or delete it"
                )
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise FashionrecError(
            f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.size and int(labels.max()) >= len(spec.class_names):
        raise FashionrecError(f"{folder}: label {int(labels.max())} is out of range")
    return images, labels.astype(np.int64), folder


def load_dataset(name="fashion_mnist", data_dir=None, verify=True, download=True):
    """Both splits of ``name`` as a :class:`Dataset`.

    Example:
        >>> ds = load_dataset("fashion_mnist")            # doctest: +SKIP
        >>> ds.x_train.shape, ds.class_names[ds.y_train[0]]  # doctest: +SKIP
        ((60000, 28, 28), 'Ankle boot')
    """
    spec = get_spec(name)
    x_train, y_train, folder = load_split(name, "train", data_dir, verify, download)
    x_test, y_test, _ = load_split(name, "test", folder, verify, download=False)
    return Dataset(name, x_train, y_train, x_test, y_test, spec.class_names, str(folder))
