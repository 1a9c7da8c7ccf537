"""Stage 3 — head: a class-weighted MLP trained on standardized backbone features.

StandardScaler -> Dense(1024, relu) -> Dropout -> Dense(512, relu, ``dense_mid``)
-> Dropout -> Dense(C, softmax); Adam, categorical cross-entropy, balanced class
weights. Its 512-d ``dense_mid`` output is the embedding the catalog is ranked in.
"""

from __future__ import annotations

import threading

import numpy as np
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from .artifacts import atomic_path, read_json, scaler_from_arrays, scaler_to_arrays, write_json
from .errors import FashionrecError
from .metric import metric_loss_from
from .metric import resolve as resolve_metric_loss

MID_LAYER = "dense_mid"
# a two-output fit (softmax + metric loss) names its history after the outputs
_HISTORY_NAMES = {"probs_accuracy": "accuracy", "val_probs_accuracy": "val_accuracy",
                  "probs_loss": "softmax_loss", "val_probs_loss": "val_softmax_loss",
                  "dense_mid_loss": "metric_loss", "val_dense_mid_loss": "val_metric_loss"}


_PREDICT_LOCK = threading.RLock()  # Keras predict() is not safe from several threads at once


def _run(model, x, batch_size):
    """``model`` on ``x``: one call for a small input (a query: no per-call data
    pipeline, tens of ms less), Keras's batched ``predict`` for a large one."""
    with _PREDICT_LOCK:
        if len(x) <= batch_size:
            return np.asarray(model.predict_on_batch(x))
        return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))


def build_head_model(input_dim, n_classes, hidden=(1024, 512), dropout=0.7):
    """The Keras head: ``input_dim`` features -> ``n_classes`` probabilities."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(input_dim,), name="features")
    x = layers.Dense(hidden[0], activation="relu", name="dense_1")(inputs)
    x = layers.Dropout(dropout, name="dropout_1")(x)
    x = layers.Dense(hidden[1], activation="relu", name=MID_LAYER)(x)
    x = layers.Dropout(dropout, name="dropout_2")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="fashionrec_head")


class ClassifierHead:
    """The trainable second stage, with scikit-learn's conventions.

    Args:
        n_classes: number of classes (labels are ``0 .. n_classes-1``).
        epochs, batch_size, learning_rate, dropout, validation_split: as in the recipe.
        seed: seeds weight init, dropout and shuffling, so a fit is repeatable.
        metric_loss: ``None`` (the recipe), or a metric-learning loss on ``dense_mid``
            beside the softmax (:func:`fashionrec.metric.resolve`: a name or a dict).
        steps_per_execution: training steps per Keras call (``"epoch"``: all of one
            epoch); jit_compile: XLA. Neither changes the fit (bench_head.py: the same
            accuracy; XLA is slower on CPU, an epoch per call within noise).
        verbose: Keras ``fit`` verbosity (``"auto"``: a progress bar on a terminal).

    Example:
        >>> head = ClassifierHead(n_classes=10, epochs=2).fit(features, labels)  # doctest: +SKIP
        >>> head.embed(features).shape                                           # doctest: +SKIP
        (15000, 512)
    """

    def __init__(self, n_classes, epochs=32, batch_size=64, learning_rate=4e-4,
                 dropout=0.7, validation_split=0.2, seed=1234, verbose="auto",
                 metric_loss=None, steps_per_execution="epoch", jit_compile=False):
        self.n_classes = n_classes
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.dropout = dropout
        self.validation_split = validation_split
        self.seed = seed
        self.verbose = verbose
        self.metric_loss = resolve_metric_loss(metric_loss)
        self.steps_per_execution = steps_per_execution
        self.jit_compile = jit_compile

    def fit(self, X, y, validation_data=None):
        """Standardize ``X``, train the MLP on one-hot ``y`` with balanced class weights
        (and, with ``metric_loss``, a metric-learning loss on ``dense_mid`` beside it).

        ``validation_data`` (features, labels), when given, gives the validation curve
        instead of the last ``validation_split`` of ``X``; it never trains the head."""
        import keras

        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if X.ndim != 2 or len(X) != len(y):
            raise FashionrecError(f"features {X.shape} and labels {y.shape} do not match")
        if y.min() < 0 or y.max() >= self.n_classes:
            raise FashionrecError(f"labels must lie in 0..{self.n_classes - 1}")
        keras.utils.set_random_seed(self.seed)
        self.scaler_ = StandardScaler().fit(X)
        present = np.unique(y)
        weights = compute_class_weight("balanced", classes=present, y=y)
        self.class_weight_ = {int(c): 1.0 for c in range(self.n_classes)}
        self.class_weight_.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
        self.model_ = build_head_model(X.shape[1], self.n_classes, dropout=self.dropout)
        x_fit, y_fit = self.scaler_.transform(X).astype(np.float32), y
        n_val = 0
        if validation_data is not None and len(validation_data[0]):
            val = (self._scaled(validation_data[0]),
                   np.asarray(validation_data[1], dtype=np.int64))
        elif self.validation_split:  # Keras's rule: the last share of the rows, unshuffled
            n_val = len(X) - int(np.floor(len(X) * (1.0 - self.validation_split)))
            val = (x_fit[len(X) - n_val:], y[len(X) - n_val:])
        else:
            val = None
        if n_val:
            x_fit, y_fit = x_fit[:len(X) - n_val], y[:len(X) - n_val]
        # Keras takes no class_weight for two outputs: the same weights, per sample
        by_class = np.array([self.class_weight_[c] for c in range(self.n_classes)],
                            dtype=np.float32)
        model = self.model_
        if self.metric_loss:
            model = keras.Model(self.model_.input, [self.model_.output,
                                                    self.model_.get_layer(MID_LAYER).output])
        steps = -(-len(x_fit) // self.batch_size)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=self.learning_rate),
            loss=(["categorical_crossentropy", metric_loss_from(self.metric_loss)]
                  if self.metric_loss else "categorical_crossentropy"),
            loss_weights=[1.0, float(self.metric_loss["weight"])] if self.metric_loss else None,
            metrics=[["accuracy"], []] if self.metric_loss else ["accuracy"],
            steps_per_execution=(steps if self.steps_per_execution == "epoch"
                                 else int(self.steps_per_execution)),
            jit_compile=bool(self.jit_compile),
        )
        history = model.fit(
            x_fit, self._targets(y_fit), sample_weight=by_class[y_fit], epochs=self.epochs,
            batch_size=self.batch_size, shuffle=True,
            validation_data=(val[0], self._targets(val[1])) if val is not None else None,
            verbose=self.verbose,
        )
        self.history_ = {_HISTORY_NAMES.get(k, k): [float(v) for v in vals]
                         for k, vals in history.history.items()}
        self._build_embedder()
        return self

    def _targets(self, y):
        """What the training model is fitted to: one-hot classes (and the labels
        themselves for the metric loss on ``dense_mid``)."""
        import keras

        onehot = keras.utils.to_categorical(y, self.n_classes).astype(np.float32)
        return (onehot, y.astype(np.int32)) if self.metric_loss else onehot

    def _build_embedder(self):
        import keras

        self.embedder_ = keras.Model(self.model_.input, self.model_.get_layer(MID_LAYER).output)

    def _check_fitted(self):
        if not hasattr(self, "model_"):
            raise FashionrecError("the head is not trained yet; call fit() first")

    def _scaled(self, X):
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.scaler_.n_features_in_:
            raise FashionrecError(
                f"features must be (N, {self.scaler_.n_features_in_}), got {X.shape}"
            )
        return self.scaler_.transform(X).astype(np.float32)

    def predict_proba(self, X, batch_size=1024):
        self._check_fitted()
        return _run(self.model_, self._scaled(X), batch_size)

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)

    def embed(self, X, batch_size=1024):
        """The 512-d ``dense_mid`` activations (dropout off) of features ``X``."""
        self._check_fitted()
        return np.asarray(_run(self.embedder_, self._scaled(X), batch_size), dtype=np.float32)

    def save(self, model_path, state_path, run_id=None):
        """Write the network (``model_path``, a ``.keras`` file) and its state
        (``state_path``, JSON: scaler, settings, history, and ``run_id``, which ties the
        head to the run it was saved with)."""
        import keras

        self._check_fitted()
        with atomic_path(model_path, suffix=".keras") as tmp:
            keras.saving.save_model(self.model_, tmp)
        write_json(state_path, {
            "run_id": run_id,
            "params": {k: getattr(self, k) for k in (
                "n_classes", "epochs", "batch_size", "learning_rate", "dropout",
                "validation_split", "seed", "metric_loss", "steps_per_execution",
                "jit_compile")},
            "class_weight": {str(k): v for k, v in self.class_weight_.items()},
            "scaler": {k: np.asarray(v).tolist() for k, v in scaler_to_arrays(self.scaler_).items()},
            "history": self.history_,
        })

    @classmethod
    def load(cls, model_path, state_path):
        import keras

        state = read_json(state_path, "head file")
        try:
            head = cls(**state["params"])
            head.scaler_ = scaler_from_arrays(state["scaler"])
            head.class_weight_ = {int(k): v for k, v in state["class_weight"].items()}
            head.history_ = state["history"]
            head.run_id_ = state.get("run_id")
        except (KeyError, TypeError) as exc:
            raise FashionrecError(f"{state_path} is not a fashionrec head ({exc})") from None
        path = model_path
        try:
            head.model_ = keras.saving.load_model(path, compile=False)
        except Exception as exc:
            raise FashionrecError(f"cannot load {path} ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        head._build_embedder()
        return head
