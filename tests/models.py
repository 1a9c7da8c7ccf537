"""Small Keras models built inside the tests (a helper module, like catalogs.py)."""

from __future__ import annotations


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
