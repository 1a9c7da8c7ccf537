"""Real 512-d embeddings for the search benchmark: the seed recipe's ``dense_mid``
outputs, re-standardized, of all 70,000 Fashion-MNIST images.

The stand-in ImageNet backbone at ``--size`` px (64 by default: 4-5 minutes of
extraction on 2 cores, cached), the head trained as in the seed recipe (first 15,000
training images, 32 epochs), every train and test image embedded, and the
embeddings standardized like a catalog index. Written to
``experiments/out/embeddings-<size>.npy`` (float32, 70,000 x 512) with labels beside.

    python experiments/embeddings.py --size 64
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def embeddings_path(size):
    return OUT / f"embeddings-{size}.npy"


def make_embeddings(size, n_train=15000, epochs=32):
    """``(embeddings, labels)`` of all 70,000 images, computed once and cached."""
    path = embeddings_path(size)
    labels_path = path.with_name(path.stem + "-labels.npy")
    if path.is_file() and labels_path.is_file():
        return np.load(path), np.load(labels_path)
    import features  # experiments/features.py: the cached extraction
    from sklearn.preprocessing import StandardScaler

    from fashionrec import ClassifierHead, load_dataset

    f_train, f_test, _, _ = features.get_features(size)
    ds = load_dataset("fashion_mnist")
    head = ClassifierHead(n_classes=10, epochs=epochs, verbose=0).fit(
        f_train[:n_train], ds.y_train[:n_train])
    emb = np.concatenate([head.embed(f_train), head.embed(f_test)])
    vectors = StandardScaler().fit_transform(emb).astype(np.float32)
    labels = np.concatenate([ds.y_train, ds.y_test]).astype(np.int64)
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    np.save(labels_path, labels)
    return vectors, labels


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    vectors, labels = make_embeddings(args.size)
    print(f"{embeddings_path(args.size)}: {vectors.shape}, {len(set(labels.tolist()))} classes")


if __name__ == "__main__":
    main()
