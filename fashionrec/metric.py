"""Metric-learning losses for the head's ``dense_mid`` layer, beside its softmax.

The softmax only asks ``dense_mid`` to separate classes linearly; these losses ask it to
put same-class products close and other classes far, on the L2-normalised embedding,
within each training batch (the formulations TensorFlow Similarity implements):

- ``multi_similarity`` (Wang et al., CVPR 2019): pairs are mined against the hardest
  pair of the other kind (margin ``epsilon``), then positives are pulled above and
  negatives pushed below the similarity ``lambda`` with soft weights ``alpha``/``beta``;
- ``supcon`` (Khosla et al., NeurIPS 2020): supervised contrastive, a softmax over the
  batch with temperature ``temperature`` in which every same-class item is a positive.

A setting is a dict, ``{"name": ..., "weight": w, **params}``; ``weight`` scales the
loss against the cross-entropy and the run records the whole dict.
"""

from __future__ import annotations

import functools

from .errors import FashionrecError

DEFAULTS = {
    "multi_similarity": {"alpha": 2.0, "beta": 40.0, "lambda": 0.5, "epsilon": 0.1},
    "supcon": {"temperature": 0.1},
}


def resolve(setting):
    """A complete metric-loss setting (defaults filled in), or ``None``; a bad one raises
    :class:`FashionrecError`."""
    if not setting:
        return None
    if isinstance(setting, str):
        setting = {"name": setting}
    if not isinstance(setting, dict) or setting.get("name") not in DEFAULTS:
        name = setting.get("name") if isinstance(setting, dict) else setting
        raise FashionrecError(f"metric loss must be one of {', '.join(DEFAULTS)}, "
                              f"got {name!r}")
    name = setting["name"]
    unknown = set(setting) - {"name", "weight", *DEFAULTS[name]}
    if unknown:
        raise FashionrecError(f"unknown {name} setting(s): {', '.join(sorted(unknown))}")
    out = {"name": name, "weight": 1.0, **DEFAULTS[name], **setting}
    for key, value in out.items():
        if key != "name" and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or value <= 0):
            raise FashionrecError(f"{name} {key} must be a number > 0, got {value!r}")
    return {k: (v if k == "name" else float(v)) for k, v in out.items()}


def metric_loss_from(setting):
    """The Keras loss of a (resolved) setting: ``loss(labels, embeddings)`` per anchor."""
    setting = resolve(setting)
    params = {k: v for k, v in setting.items() if k not in ("name", "weight")}
    multi_similarity, supcon = _classes()
    return (multi_similarity if setting["name"] == "multi_similarity" else supcon)(**params)


def _pairs(labels, embeddings):
    """Cosine similarities of the batch, and its positive and negative pair masks."""
    from keras import ops

    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    e = embeddings / (ops.sqrt(ops.sum(ops.square(embeddings), axis=1, keepdims=True)) + 1e-9)
    sim = ops.matmul(e, ops.transpose(e))
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    not_self = ops.logical_not(ops.cast(ops.eye(ops.shape(sim)[0]), "bool"))
    return sim, ops.logical_and(same, not_self), ops.logical_not(same)


@functools.cache
def _classes():
    import keras
    from keras import ops

    class MultiSimilarity(keras.losses.Loss):
        def __init__(self, alpha=2.0, beta=40.0, epsilon=0.1, name="multi_similarity",
                     **kw):
            self.lam = kw.pop("lambda", 0.5)
            super().__init__(name=name, **kw)
            self.alpha, self.beta, self.epsilon = alpha, beta, epsilon

        def call(self, y_true, y_pred):
            sim, pos, neg = _pairs(y_true, y_pred)
            # mining: a negative counts if it is more similar than the least similar
            # positive (less epsilon); a positive if less similar than the most similar
            # negative (plus epsilon)
            hardest_pos = ops.min(ops.where(pos, sim, 2.0), axis=1, keepdims=True)
            hardest_neg = ops.max(ops.where(neg, sim, -2.0), axis=1, keepdims=True)
            pos = ops.logical_and(pos, sim - self.epsilon < hardest_neg)
            neg = ops.logical_and(neg, sim + self.epsilon > hardest_pos)
            pull = ops.sum(ops.where(pos, ops.exp(-self.alpha * (sim - self.lam)), 0.0), 1)
            push = ops.sum(ops.where(neg, ops.exp(self.beta * (sim - self.lam)), 0.0), 1)
            return ops.log1p(pull) / self.alpha + ops.log1p(push) / self.beta

    class SupCon(keras.losses.Loss):
        def __init__(self, temperature=0.1, name="supcon", **kw):
            super().__init__(name=name, **kw)
            self.temperature = temperature

        def call(self, y_true, y_pred):
            sim, pos, _ = _pairs(y_true, y_pred)
            n = ops.shape(sim)[0]
            logits = sim / self.temperature
            others = ops.logical_not(ops.cast(ops.eye(n), "bool"))
            logits = ops.where(others, logits, -1e9)  # an item is not its own candidate
            log_prob = logits - ops.logsumexp(logits, axis=1, keepdims=True)
            n_pos = ops.sum(ops.cast(pos, "float32"), axis=1)
            mean_pos = ops.sum(ops.where(pos, log_prob, 0.0), axis=1) / ops.maximum(n_pos, 1.0)
            return -mean_pos  # an anchor with no positive in the batch adds 0

    return MultiSimilarity, SupCon
