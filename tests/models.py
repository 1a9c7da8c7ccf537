"""Small Keras models built inside the tests, and how two of a model's answers are
compared (a helper module, like catalogs.py)."""

from __future__ import annotations

import numpy as np


def same_answers(a, b, kinds, atol, rtol=0.0):
    """``a`` and ``b`` (``{kind: [(id, distance), ...]}``) list the same ids in the same
    order for each of ``kinds``, with distances equal within ``atol`` / ``rtol``."""
    for kind in kinds:
        assert [i for i, _ in a[kind]] == [i for i, _ in b[kind]], kind
        np.testing.assert_allclose([d for _, d in a[kind]], [d for _, d in b[kind]],
                                   atol=atol, rtol=rtol)


def tiny_backbone(path, out_rank=2):
    """A small saved Keras model standing in for a custom backbone.

    ``out_rank=2`` ends it with global average pooling (one vector per image);
    ``out_rank=4`` leaves it a feature map, which a backbone must not be."""
    import keras

    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, name="c")(inp)
    if out_rank == 2:
        x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, x)
    model.save(path)
    return path
