"""Lean replicas: an OpenVINO run answers without importing TensorFlow.

A run's head is saved twice: as Keras saves it (``head.keras``) and as plain NumPy
weights (``head_weights.h5``, :func:`export_head`: the feature scaler and every Dense
layer's kernel, bias and activation, in HDF5, no pickle). A run whose backbone runs in
OpenVINO also saves the converted backbone as OpenVINO IR (``backbone.xml`` and
``backbone.bin``, :func:`fashionrec.engine.save_ir`).

Loading such a run (:meth:`fashionrec.embedder.Embedder.load`) then takes the *lean
path*: the head is a :class:`NumpyHead` (the Keras head's float32 math in NumPy, equal
within 1e-4) and OpenVINO reads the IR directly, so neither Keras nor TensorFlow is
imported: ``fashionrec serve`` starts in a fraction of the time and memory
(``experiments/bench_replica.py``). Keras-engine runs load as they always did.

``FASHIONREC_ENGINE_PATH=keras`` (``fashionrec serve --engine-path keras``) forces the
Keras path for any run. Runs saved before this existed have no ``head_weights.h5``:
they load the Keras head, and without the IR their backbone is converted from Keras
at first use, as before; nothing is written on load.

Example:
    >>> head = NumpyHead.load("runs/x/versions/<id>/head_weights.h5")  # doctest: +SKIP
    >>> head.embed(features).shape                                     # doctest: +SKIP
    (100, 512)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .artifacts import atomic_path, read_json
from .errors import FashionrecError
from .head import MID_LAYER

ENGINE_PATH_VAR = "FASHIONREC_ENGINE_PATH"
ENGINE_PATHS = ("auto", "keras")  # auto: lean where the run allows; keras: always Keras
FORMAT = "fashionrec-head-weights"
FORMAT_VERSION = 1
ACTIVATIONS = ("relu", "softmax", "linear")
_DESCRIPTION = ("The fashionrec head as plain arrays. Features x are standardized, "
                "x = (x - scaler/mean) / scaler/scale, then each layer of the attribute "
                "'layers' in order computes x = activation(x @ layers/<name>/kernel + "
                "layers/<name>/bias) in float32 (dropout is off at inference; softmax over "
                "the last axis). The output of layer 'embedding_layer' is the embedding, "
                "the last layer's the class probabilities.")


def engine_path():
    """The engine path asked for by ``FASHIONREC_ENGINE_PATH`` (default ``auto``)."""
    value = os.environ.get(ENGINE_PATH_VAR) or "auto"
    if value not in ENGINE_PATHS:
        raise FashionrecError(f"{ENGINE_PATH_VAR} must be one of {', '.join(ENGINE_PATHS)}, "
                              f"got {value!r}")
    return value


def wanted(info):
    """Whether a run whose backbone is ``info`` (a
    :class:`~fashionrec.extract.BackboneInfo`) loads lean where its files allow: its
    engine is OpenVINO and the Keras path is not forced."""
    return info.engine == "openvino" and engine_path() == "auto"


def serves_lean(run_dir):
    """Whether the published version of ``run_dir`` loads without TensorFlow (its
    engine is OpenVINO, the Keras path is not forced, and it has its NumPy head and
    backbone IR). Cheap (one small JSON file and two ``stat`` calls); ``False`` when
    the run cannot be read (loading it then says why)."""
    from .extract import BackboneInfo
    from .rundir import RunDir

    try:
        run = RunDir(run_dir)
        meta = run.read()
        version = run.version_of(meta)
        info = BackboneInfo.from_dict(meta["backbone"])
        return wanted(info) and version.head_weights.is_file() and version.backbone_ir.is_file()
    except (FashionrecError, KeyError, TypeError, OSError):
        return False


def export_head(head, path, run_id):
    """Write a trained :class:`~fashionrec.head.ClassifierHead` as NumPy weights
    (``head_weights.h5``, atomically); see :class:`NumpyHead`."""
    return NumpyHead.from_keras(head, run_id).save(path)


class NumpyHead:
    """The trained head in NumPy: the same answers as the Keras head (float32 matmuls
    and activations; dropout is off at inference) without Keras.

    Args:
        mean, scale: the feature scaler's mean and scale (features are standardized
            as ``(x - mean) / scale``, as scikit-learn's StandardScaler does).
        layers: ``(name, activation, kernel, bias)`` of each Dense layer in order;
            activation one of :data:`ACTIVATIONS`.
        embedding_layer: the layer whose output is the embedding (``dense_mid``).
        run_id: the run the head was saved with.
        state: the head's saved state (``head.json``: ``params``, ``history``), if
            read; its ``params`` become attributes as on a ``ClassifierHead``.
    """

    def __init__(self, mean, scale, layers, embedding_layer=MID_LAYER, run_id=None,
                 state=None):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.layers = [(str(name), str(act), np.asarray(kernel, np.float32),
                        np.asarray(bias, np.float32)) for name, act, kernel, bias in layers]
        self.embedding_layer = embedding_layer
        self.run_id_ = run_id
        state = state or {}
        for key, value in (state.get("params") or {}).items():
            setattr(self, key, value)
        self.history_ = state.get("history") or {}
        self.n_classes = self.layers[-1][2].shape[1]
        self._check()

    def _check(self):
        """The shapes chain and the activations are known: else a one-line error."""
        dim = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.scale.shape != self.mean.shape or dim < 0:
            raise FashionrecError(f"head weights: scaler mean {self.mean.shape} and scale "
                                  f"{self.scale.shape} do not match")
        for name, act, kernel, bias in self.layers:
            if act not in ACTIVATIONS:
                raise FashionrecError(f"head weights: layer {name} has activation {act!r}; "
                                      f"known: {', '.join(ACTIVATIONS)}")
            if kernel.ndim != 2 or kernel.shape[0] != dim or bias.shape != kernel.shape[1:]:
                raise FashionrecError(f"head weights: layer {name} has kernel {kernel.shape} "
                                      f"and bias {bias.shape} after {dim} inputs")
            dim = kernel.shape[1]
        if self.embedding_layer not in [name for name, *_ in self.layers]:
            raise FashionrecError(f"head weights: no embedding layer {self.embedding_layer!r}")

    # ------------------------------------------------------------ answers
    def _scaled(self, X):
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.mean.shape[0]:
            raise FashionrecError(f"features must be (N, {self.mean.shape[0]}), got {X.shape}")
        return ((X - self.mean) / self.scale).astype(np.float32)

    def _forward(self, X, until, batch_size):
        """The output of layer ``until`` (its name) for features ``X``, a batch of
        ``batch_size`` rows at a time."""
        X = self._scaled(X)
        out = None
        for start in range(0, max(len(X), 1), batch_size):
            x = X[start:start + batch_size]
            for name, act, kernel, bias in self.layers:
                x = _activate(x @ kernel + bias, act)
                if name == until:
                    break
            if out is None:
                out = np.empty((len(X), x.shape[1]), np.float32)
            out[start:start + len(x)] = x
        return out

    def predict_proba(self, X, batch_size=1024):
        """Class probabilities of features ``X`` (``(N, n_classes)``)."""
        return self._forward(X, self.layers[-1][0], batch_size)

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)

    def embed(self, X, batch_size=1024):
        """The 512-d ``dense_mid`` activations of features ``X``."""
        return self._forward(X, self.embedding_layer, batch_size)

    # ------------------------------------------------------------ files
    @classmethod
    def from_keras(cls, head, run_id=None):
        """The NumPy copy of a trained :class:`~fashionrec.head.ClassifierHead`: its
        scaler and the Dense layers of its network, read from the model itself (their
        activations included). A layer other than Dense or Dropout cannot be copied:
        a one-line error."""
        head._check_fitted()
        layers = []
        for layer in head.model_.layers:
            kind = type(layer).__name__
            if kind in ("InputLayer", "Dropout"):  # dropout is off at inference
                continue
            config = layer.get_config()
            if kind != "Dense" or not config.get("use_bias", True):
                raise FashionrecError(f"the head cannot be exported to NumPy: layer "
                                      f"{layer.name} is a {kind}"
                                      f"{'' if kind != 'Dense' else ' without a bias'}")
            kernel, bias = (np.asarray(w, np.float32) for w in layer.get_weights())
            layers.append((layer.name, config["activation"], kernel, bias))
        state = {"params": {"n_classes": head.n_classes}, "history": head.history_}
        return cls(head.scaler_.mean_, head.scaler_.scale_, layers, MID_LAYER, run_id, state)

    def save(self, path):
        """Write the weights as HDF5 (atomically; see the file's ``description``)."""
        with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                            "description": _DESCRIPTION,
                            "run_id": "" if self.run_id_ is None else str(self.run_id_),
                            "embedding_layer": self.embedding_layer,
                            "layers": json.dumps([[name, act] for name, act, *_ in self.layers])})
            f.create_dataset("scaler/mean", data=self.mean)
            f.create_dataset("scaler/scale", data=self.scale)
            for name, _, kernel, bias in self.layers:
                f.create_dataset(f"layers/{name}/kernel", data=kernel)
                f.create_dataset(f"layers/{name}/bias", data=bias)
        return path

    @classmethod
    def load(cls, path, state_path=None):
        """The head saved by :meth:`save` (and, with ``state_path``, its ``head.json``
        settings and history). A missing, foreign or damaged file is a one-line
        :class:`FashionrecError`."""
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise FashionrecError(f"{path} is not fashionrec head weights")
                if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
                    raise FashionrecError(f"{path} was written by a newer fashionrec "
                                          f"(format {f.attrs['format_version']})")
                names = json.loads(f.attrs["layers"])
                layers = [(name, act, f[f"layers/{name}/kernel"][()],
                           f[f"layers/{name}/bias"][()]) for name, act in names]
                mean, scale = f["scaler/mean"][()], f["scaler/scale"][()]
                run_id = str(f.attrs["run_id"]) or None
                embedding = str(f.attrs["embedding_layer"])
        except FileNotFoundError:
            raise FashionrecError(f"head weights {path} do not exist") from None
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise FashionrecError(f"head weights {path} are unreadable or damaged "
                                  f"({type(exc).__name__}: {exc})") from None
        state = read_json(state_path, "head file") if state_path is not None else None
        if state is not None and state.get("run_id") != run_id:
            raise FashionrecError(f"{Path(path).parent} mixes files of two runs (an "
                                  f"interrupted save?); re-run `make train`")
        return cls(mean, scale, layers, embedding, run_id, state)


def _activate(x, activation):
    if activation == "relu":
        return np.maximum(x, 0, out=x)
    if activation == "softmax":  # numerically stable: the row's largest logit is 0
        x = np.exp(x - x.max(axis=1, keepdims=True))
        return x / x.sum(axis=1, keepdims=True)
    return x  # linear
