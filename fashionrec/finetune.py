"""Fine-tuning the backbone's last stage (``--fine-tune-blocks N``).

The backbone is cut before the last ``N`` residual blocks of its last stage: the frozen
part runs once per training view (its feature maps are kept, float16), and only the
last blocks (batch norms kept in inference mode) learn, together with a softmax layer
on their pooled output (the run's pooling), at a small learning rate. The two parts
share their layers with the backbone, so training the top tunes the backbone itself:
it is saved as a ``.keras`` file, which the run then uses like any saved backbone (its
own fingerprint, feature cache key and engine export, OpenVINO too).
"""

from __future__ import annotations

import re
import time

import numpy as np

from .errors import FashionrecError

BLOCK_OUT = re.compile(r"^conv(\d+)_block(\d+)_out$")


def split(model, blocks):
    """``(frozen, top, cut)``: ``model`` (ending in global pooling) cut after layer
    ``cut``, the output of the block before the last ``blocks`` of its last stage."""
    import keras

    outs = sorted((int(m[1]), int(m[2]), layer.name) for layer in model.layers
                  if (m := BLOCK_OUT.match(layer.name)))
    if not outs:
        raise FashionrecError("--fine-tune-blocks needs a ResNet backbone (layers named "
                              "convS_blockB_out); this one has none")
    stage = outs[-1][0]
    n_last = sum(1 for s, _, _ in outs if s == stage)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= n_last:
        raise FashionrecError(f"--fine-tune-blocks must be 1..{n_last} (the blocks of the "
                              f"backbone's last stage), got {blocks!r}")
    if blocks == len(outs):
        raise FashionrecError("--fine-tune-blocks would leave nothing frozen")
    cut = outs[len(outs) - blocks - 1][2]
    tensor = model.get_layer(cut).output
    frozen = keras.Model(model.input, tensor, name="frozen")
    top = keras.Model(tensor, model.output, name="tuned")
    for layer in top.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # inference-mode statistics: a few photos per class
    return frozen, top, cut


def frozen_maps(frozen, images, batch_size=16, progress=False):
    """The frozen part's feature maps of ``images`` (``(N, S, S, 3)`` model input,
    or a lazy array), float16."""
    from tqdm.auto import tqdm

    out = None
    for start in tqdm(range(0, len(images), batch_size), disable=not progress,
                      desc="frozen part", unit="batch"):
        x = np.asarray(images[start:start + batch_size], dtype=np.float32)
        maps = np.asarray(frozen.predict_on_batch(x), dtype=np.float16)
        if out is None:
            out = np.empty((len(images), *maps.shape[1:]), dtype=np.float16)
        out[start:start + len(maps)] = maps
    return out


def train_top(top, maps, labels, n_classes, epochs=3, batch_size=32, learning_rate=1e-4,
              seed=1234, verbose=0):
    """Train the last blocks and a softmax on their pooled output, class-weighted;
    returns ``(seconds, history)``."""
    import keras
    from sklearn.utils.class_weight import compute_class_weight

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(top.input_shape[1:])
    probs = keras.layers.Dense(n_classes, activation="softmax", name="tune_probs")(
        top(inputs))
    model = keras.Model(inputs, probs)
    model.compile(keras.optimizers.Adam(learning_rate), "categorical_crossentropy",
                  metrics=["accuracy"])
    present = np.unique(labels)
    weights = dict(zip(present.tolist(), compute_class_weight(
        "balanced", classes=present, y=labels).tolist(), strict=True))

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.order = np.random.default_rng(seed).permutation(len(maps))

        def __len__(self):
            return -(-len(maps) // batch_size)

        def __getitem__(self, i):
            rows = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
            y = labels[rows]
            return (maps[rows].astype(np.float32),
                    keras.utils.to_categorical(y, n_classes),
                    np.array([weights[int(c)] for c in y], dtype=np.float32))

        def on_epoch_end(self):
            np.random.default_rng(seed + 1).shuffle(self.order)

    t = time.perf_counter()
    history = model.fit(Batches(), epochs=epochs, verbose=verbose)
    return time.perf_counter() - t, {k: [float(v) for v in vals]
                                     for k, vals in history.history.items()}


def tune_backbone(cfg, catalog, labels, n_classes, cache_dir, progress=True, say=print):
    """Fine-tune ``cfg``'s backbone on ``catalog`` (the training products, every view,
    classes ``labels``); ``(path of the tuned .keras backbone, record)``. The file is
    kept in ``cache_dir`` under a key of everything that decides it, so training again
    with the same products and settings reuses it."""
    import hashlib
    import json
    from pathlib import Path

    import keras

    from .artifacts import atomic_path, peak_rss_mb
    from .extract import build_backbone, to_model_input, with_pooling
    from .images import ImageFiles

    if cache_dir is None:
        raise FashionrecError("fine-tuning keeps the tuned backbone in the run's feature "
                              "folder: give a cache_dir (the CLI does)")
    t0 = time.perf_counter()
    raw, info = build_backbone(cfg.backbone, cfg.weights, cfg.image_size, cfg.seed,
                               log=say, pooling="avg", engine="keras", precision="float32")
    settings = {"blocks": cfg.fine_tune_blocks, "epochs": cfg.fine_tune_epochs,
                "learning_rate": cfg.fine_tune_learning_rate, "batch_size": 32,
                "seed": cfg.seed, "pooling": cfg.pooling, "views": cfg.views()}
    key = hashlib.sha256(json.dumps([info.fingerprint, settings, catalog.content_digest(),
                                     np.asarray(labels).tolist()], default=str).encode())
    path = Path(cache_dir) / f"backbone-tuned-{key.hexdigest()[:16]}.keras"
    record_path = path.with_suffix(".json")
    if path.is_file() and record_path.is_file():
        say(f"fine-tune: reusing {path}")
        return path, json.loads(record_path.read_text())
    pooled = with_pooling(raw, cfg.pooling)
    frozen, top, cut = split(pooled, cfg.fine_tune_blocks)
    views = cfg.views()
    say(f"fine-tune: the last {cfg.fine_tune_blocks} block(s) after {cut}, on "
        f"{len(catalog)} products x {len(views)} views, {cfg.fine_tune_epochs} epochs")
    files = ImageFiles(catalog.paths, cfg.image_size, views=views)

    class Inputs:  # the model input of every view of every product, read lazily
        def __len__(self):
            return len(files) * len(views)

        def __getitem__(self, s):
            items = range(*s.indices(len(self)))
            first, last = items.start // len(views), (items.stop - 1) // len(views) + 1
            x = np.asarray(files[first:last]).reshape(-1, cfg.image_size, cfg.image_size, 3)
            offset = first * len(views)
            return to_model_input(x[items.start - offset:items.stop - offset],
                                  cfg.image_size)

    t = time.perf_counter()
    maps = frozen_maps(frozen, Inputs(), 16, progress)
    maps_s = time.perf_counter() - t
    y = np.repeat(np.asarray(labels, dtype=np.int64), len(views))
    train_s, history = train_top(top, maps, y, n_classes, cfg.fine_tune_epochs, 32,
                                 cfg.fine_tune_learning_rate, cfg.seed,
                                 "auto" if progress else 0)
    with atomic_path(path, suffix=".keras") as tmp:
        keras.saving.save_model(raw, tmp)  # the layers top trained are raw's own
    record = {**settings, "cut_after": cut, "n_products": len(catalog),
              "n_inputs": int(len(y)), "maps_shape": list(maps.shape[1:]),
              "maps_gb": round(maps.nbytes / 1e9, 3), "frozen_part_s": round(maps_s, 1),
              "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1),
              "peak_rss_mb": round(peak_rss_mb()), "base_backbone": info.to_dict(),
              "history": history}
    with atomic_path(record_path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1))
    say(f"fine-tune: {record['total_s']:.0f} s (frozen part {maps_s:.0f} s, training "
        f"{train_s:.0f} s), peak RSS {record['peak_rss_mb']} MB -> {path}")
    return path, record
