import gzip
import hashlib
import struct

import numpy as np
import pytest

from fashionrec import FashionrecError
from fashionrec import data as data_mod
from fashionrec.data import DatasetSpec, load_dataset, load_split, locate, read_idx


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())
    return path


def make_fake_dataset(folder, n_train=10, n_test=6):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return folder


def test_read_idx_round_trips_images_and_labels(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i.gz", images)), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l.gz", labels)), labels)


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = write_idx(tmp_path / "i.gz", np.zeros((4, 28, 28)))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(FashionrecError, match="truncated or corrupt"):
        read_idx(path)


def test_truncated_gzip_stream_is_a_clear_error(tmp_path):
    path = write_idx(tmp_path / "i.gz", np.zeros((40, 28, 28)))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(FashionrecError, match="not a readable gzip IDX"):
        read_idx(path)


def test_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"PK\x03\x04 definitely not idx"))
    with pytest.raises(FashionrecError, match="no IDX header"):
        read_idx(path)
    plain = tmp_path / "plain.gz"
    plain.write_text("hello")
    with pytest.raises(FashionrecError, match="not a readable gzip"):
        read_idx(plain)


def test_checksum_mismatch_names_the_file(tmp_path):
    folder = make_fake_dataset(tmp_path / "fake")
    with pytest.raises(FashionrecError, match="SHA-256 .* is not the published"):
        load_split("fashion_mnist", "train", data_dir=folder)


def test_unverified_load_reads_custom_files(tmp_path):
    folder = make_fake_dataset(tmp_path / "fake")
    ds = load_dataset("fashion_mnist", data_dir=folder, verify=False)
    assert ds.x_train.shape == (10, 28, 28) and ds.x_test.shape == (6, 28, 28)
    assert ds.y_train.tolist() == list(range(10))
    assert ds.source == str(folder)


def test_data_dir_is_searched_first_then_its_subfolder(tmp_path, fmnist_dir):
    own = make_fake_dataset(tmp_path / "mine" / "fashion-mnist")
    assert locate("fashion_mnist", data_dir=tmp_path / "mine") == own
    # an empty DATA_DIR falls through to the next place that has the files
    (tmp_path / "empty").mkdir()
    assert locate("fashion_mnist", data_dir=tmp_path / "empty") != tmp_path / "empty"


def test_real_fashion_mnist_from_the_shared_mirror(fmnist_dir):
    ds = load_dataset("fashion_mnist", data_dir=fmnist_dir)
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert ds.x_train.dtype == np.uint8
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[ds.y_train[0]] == "Ankle boot"  # the dataset's first image


def test_checked_download_into_the_keras_cache(tmp_path, monkeypatch):
    """The download path, offline: a file:// origin, SHA-256 checked by Keras."""
    origin = make_fake_dataset(tmp_path / "origin")
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in origin.iterdir()}
    spec = DatasetSpec("fake", "fake", origin.as_uri() + "/", sums, tuple("0123456789"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    folder = data_mod._download(spec, tried=[])
    assert folder == tmp_path / "keras" / "datasets" / "fake"
    assert sorted(p.name for p in folder.iterdir()) == sorted(sums)


def test_failed_download_says_where_it_looked(tmp_path, monkeypatch):
    origin = make_fake_dataset(tmp_path / "origin")
    sums = {p.name: "0" * 64 for p in origin.iterdir()}  # wrong hashes
    spec = DatasetSpec("fake", "fake", origin.as_uri() + "/", sums, tuple("0123456789"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(FashionrecError, match="not found locally .*looked in /somewhere"):
        data_mod._download(spec, tried=["/somewhere"])


def test_unknown_dataset():
    with pytest.raises(FashionrecError, match="unknown dataset"):
        load_split("cifar", "train")
