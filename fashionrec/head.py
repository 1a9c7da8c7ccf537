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

MID_LAYER = "dense_mid"


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
        verbose: Keras ``fit`` verbosity (``"auto"``: a progress bar on a terminal).

    Example:
        >>> head = ClassifierHead(n_classes=10, epochs=2).fit(features, labels)  # doctest: +SKIP
        >>> head.embed(features).shape                                           # doctest: +SKIP
        (15000, 512)
    """

    def __init__(self, n_classes, epochs=32, batch_size=64, learning_rate=4e-4,
                 dropout=0.7, validation_split=0.2, seed=1234, verbose="auto"):
        self.n_classes = n_classes
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.dropout = dropout
        self.validation_split = validation_split
        self.seed = seed
        self.verbose = verbose

    def fit(self, X, y, validation_data=None):
        """Standardize ``X``, train the MLP on one-hot ``y`` with balanced class weights.

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
        self.model_.compile(
            optimizer=keras.optimizers.Adam(learning_rate=self.learning_rate),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
        split = {"validation_split": self.validation_split}
        if validation_data is not None and len(validation_data[0]):
            x_val, y_val = validation_data
            split = {"validation_data": (self._scaled(x_val),
                                         keras.utils.to_categorical(y_val, self.n_classes))}
        history = self.model_.fit(
            self.scaler_.transform(X).astype(np.float32),
            keras.utils.to_categorical(y, self.n_classes),
            epochs=self.epochs,
            batch_size=self.batch_size,
            **split,
            class_weight=self.class_weight_,
            verbose=self.verbose,
        )
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        self._build_embedder()
        return self

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
                "validation_split", "seed")},
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
