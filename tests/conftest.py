"""Shared fixtures: tiny configurations on the real Fashion-MNIST files from
../shared (random ResNet50 weights, 32 px, a few dozen images)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fashionrec.config import shared_dirs  # noqa: E402

# The tiny model every trained test run uses: 32 px, a randomly initialised ResNet50
# (no download), two epochs of the head. Test modules import these
# (``from conftest import TINY_MODEL``) rather than defining their own.
TINY_MODEL = dict(image_size=32, weights="none", epochs=2, batch_size=8,
                  extract_batch_size=16)
# A tiny Fashion-MNIST run: 48 training and 24 catalog images; its head trains in
# batches of 16 (three per epoch).
TINY = dict(n_train=48, n_reco=24, **{**TINY_MODEL, "batch_size": 16})


@pytest.fixture(scope="session")
def fmnist_dir():
    for shared in shared_dirs():
        d = shared / "datasets" / "fashion-mnist"
        if (d / "t10k-images-idx3-ubyte.gz").is_file():
            return d
    pytest.skip("../shared/datasets/fashion-mnist is not present")


@pytest.fixture(scope="session")
def tiny_config(fmnist_dir):
    from fashionrec import RunConfig

    return RunConfig(data_dir=str(fmnist_dir), **TINY)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_config):
    """A tiny run trained once per session and saved; returns (Recommender, run_dir)."""
    from fashionrec import Recommender

    run_dir = tmp_path_factory.mktemp("run")
    rec = Recommender(tiny_config).fit(cache_dir=run_dir / "features", progress=False,
                                       log=None)
    rec.save(run_dir)
    return rec, run_dir
