"""Inference engines for the frozen backbone: the same network, run by Keras or by
OpenVINO, in float32 or bfloat16.

Only the backbone (the bulk of a run's time) changes engine. An OpenVINO run also saves
its converted backbone as OpenVINO IR (:func:`save_ir`) beside a NumPy copy of its head
(:mod:`fashionrec.lean`): loaded from those (:func:`read_ir`), it answers without
importing TensorFlow. ``auto`` picks OpenVINO in bfloat16 where OpenVINO is installed and the CPU
computes bfloat16 natively (AVX-512 BF16 or AMX), else Keras in float32 (the recipe).
The engine and precision a run used are part of its :class:`~fashionrec.extract.BackboneInfo`
(so of its feature cache's key), and a saved run answers photo queries with the same.

Example:
    >>> model, info = build_backbone(weights="none", image_size=32)      # doctest: +SKIP
    >>> engine = make_engine(model, "openvino", "bfloat16", 32)           # doctest: +SKIP
    >>> engine(np.zeros((2, 32, 32, 3), np.float32)).shape                # doctest: +SKIP
    (2, 2048)
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np

from .artifacts import cpu_info, short_reason
from .config import ENGINES, PRECISIONS
from .errors import FashionrecError

OPENVINO_HINT = "pip install 'fashionrec[openvino]'"


def native_bf16(flags=None):
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX-BF16)."""
    flags = cpu_info()[1] if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def openvino_version():
    """OpenVINO's version, or ``None`` where it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def resolve(engine="auto", precision="auto", flags=None, have_openvino=None):
    """The concrete ``(engine, precision, why)`` for what was asked.

    ``auto`` engine: OpenVINO where installed and the CPU has native bfloat16 (where
    it is measured 2-4x faster than Keras at a feature cosine of 0.99998, see
    ``experiments/bench_extract.py``), else Keras. ``auto`` precision: bfloat16 with
    OpenVINO on such a CPU, else float32. Asking for something unknown, or for OpenVINO
    where it is not installed, is a one-line :class:`FashionrecError`.
    """
    if engine not in ENGINES:
        raise FashionrecError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
        raise FashionrecError(f"precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {precision!r}")
    have_openvino = openvino_version() is not None if have_openvino is None else have_openvino
    bf16 = native_bf16(flags)
    if engine == "openvino" and not have_openvino:
        raise FashionrecError(f"engine openvino: OpenVINO is not installed ({OPENVINO_HINT})")
    why = "asked for"
    if engine == "auto":
        if have_openvino and bf16 and precision in ("auto", "bfloat16"):
            engine, why = "openvino", "auto: OpenVINO installed, CPU has native bfloat16"
        elif not have_openvino:
            engine, why = "keras", f"auto: OpenVINO not installed ({OPENVINO_HINT} is faster)"
        elif not bf16:
            engine, why = "keras", "auto: this CPU has no native bfloat16"
        else:
            engine, why = "keras", "auto: float32 asked for"
    if precision == "auto":
        precision = "bfloat16" if engine == "openvino" and bf16 else "float32"
    elif precision == "bfloat16" and not bf16:
        why += ("; this CPU has no native bfloat16: expect it slower than float32, and "
                "features that differ slightly from a bfloat16 CPU's")
    return engine, precision, why


class KerasEngine:
    """The backbone run by Keras (TensorFlow); ``bfloat16`` computes under Keras's
    ``mixed_bfloat16`` policy with the same float32 weights."""

    name = "keras"

    def __init__(self, model, precision="float32"):
        self.precision = precision
        self.model = model if precision == "float32" else _mixed_bfloat16(model)
        self._lock = threading.Lock()  # one backbone call at a time (a server's threads)

    def __call__(self, x):
        if len(x) == 0:  # Keras cannot predict on an empty batch
            return np.empty((0, self.model.output_shape[-1]), np.float32)
        with self._lock:
            return np.asarray(self.model.predict_on_batch(x), dtype=np.float32)

    def map(self, batches):
        """``(key, x)`` pairs in, ``(key, features)`` out, in order, one call each."""
        for key, x in batches:
            yield key, self(x)


class OpenVINOEngine:
    """The backbone converted to OpenVINO (in memory, from the Keras model, or read
    from a run's saved IR: an ``openvino.Model``) and compiled for the CPU with
    ``INFERENCE_PRECISION_HINT`` f32 or bf16; any batch size.

    Compiled for throughput: each batch is cut into one slice per OpenVINO stream (one
    per core or pair of cores, as it chooses), and :meth:`map` keeps the next batch's
    slices queued behind the current ones, so no stream waits for another at the end of
    a batch (a core that is busy decoding images holds up only its own slice). Calls
    from several threads are safe: each takes its own infer requests.
    """

    name = "openvino"

    def __init__(self, model, precision="float32", image_size=224):
        ov = _openvino()
        self.precision = precision
        try:
            # a model read from IR is converted already; a Keras one is converted here
            # (not kept: the compiled model holds its own copy of the weights)
            converted = model if isinstance(model, ov.Model) else _convert(ov, model,
                                                                            image_size)
            self.compiled = ov.Core().compile_model(converted, "CPU", {
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
                "PERFORMANCE_HINT": "THROUGHPUT"})
            self.streams = max(1, int(self.compiled.get_property(
                "OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            self.dim = self.compiled.output(0).get_partial_shape()[-1].get_length()
        except Exception as exc:  # conversion and compilation raise many types
            raise FashionrecError(f"engine openvino could not compile the backbone "
                                  f"({short_reason(exc)[:200]}); use --engine keras") from None
        self._idle = queue.SimpleQueue()  # sets of infer requests between calls

    def __call__(self, x):
        stream = self.map([(None, x)])
        try:
            return next(stream)[1]
        finally:
            stream.close()

    def map(self, batches):
        """``(key, x)`` pairs in, ``(key, features)`` out, in order; two batches in
        flight (``2 x streams`` infer requests)."""
        from collections import deque

        try:
            requests = self._idle.get_nowait()
        except queue.Empty:  # none idle: this call makes its own
            requests = [self.compiled.create_infer_request() for _ in range(2 * self.streams)]
        free, pending = deque(requests), deque()

        def collect():
            key, out, parts = pending.popleft()
            for request, lo, hi in parts:
                request.wait()
                out[lo:hi] = request.get_output_tensor(0).data
                free.append(request)
            return key, out

        try:
            for key, x in batches:
                x = np.ascontiguousarray(x, dtype=np.float32)
                bounds = np.linspace(0, len(x), min(self.streams, len(x)) + 1).astype(int)
                while len(free) < len(bounds) - 1:
                    yield collect()
                parts = []
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                    request = free.popleft()
                    request.start_async({0: x[lo:hi]})  # inputs copied into the request
                    parts.append((request, lo, hi))
                pending.append((key, np.empty((len(x), self.dim), np.float32), parts))
            while pending:
                yield collect()
        finally:
            for _, _, parts in pending:  # stopped early: let the started slices finish
                for request, _, _ in parts:
                    with contextlib.suppress(Exception):  # an error was raised already
                        request.wait()
            self._idle.put(requests)


def make_engine(model, engine, precision, image_size):
    """An engine running ``model``: ``engine(x)`` maps a preprocessed ``(N, S, S, 3)``
    float32 batch to ``(N, D)`` float32 features, ``engine.map(pairs)`` streams
    ``(key, x)`` batches to ``(key, features)`` in order. ``engine`` and ``precision``
    are concrete (:func:`resolve`)."""
    if engine == "keras":
        return KerasEngine(model, precision)
    if engine == "openvino":
        return OpenVINOEngine(model, precision, image_size)
    raise FashionrecError(f"unknown engine {engine!r}; one of keras, openvino")


def save_ir(model, info, xml_path):
    """Write the backbone as OpenVINO IR: ``xml_path`` and the ``.bin`` beside it (its
    float32 weights, uncompressed), each atomically, the weights first (an ``.xml``
    always names a complete pair). ``model``: an ``openvino.Model`` (an
    :class:`OpenVINOEngine`'s ``converted``) or the Keras backbone. The IR records the
    backbone's fingerprint and description, which :func:`read_ir` checks.

    Args:
        model: the backbone.
        info: its :class:`~fashionrec.extract.BackboneInfo`.
        xml_path: where the IR goes (``Version.backbone_ir``).
    """
    import shutil
    import tempfile
    from pathlib import Path

    from .artifacts import atomic_path

    ov = _openvino()
    if not isinstance(model, ov.Model):
        try:
            model = _convert(ov, model, info.image_size)
        except Exception as exc:  # conversion raises many types
            raise FashionrecError(f"engine openvino could not convert the backbone "
                                  f"({short_reason(exc)[:200]})") from None
    for key, value in _ir_tags(info).items():
        model.set_rt_info(value, [IR_SECTION, key])
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".backbone-ir.", dir=xml_path.parent) as tmp:
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        for name, target in (("model.bin", xml_path.with_suffix(".bin")),
                             ("model.xml", xml_path)):
            with atomic_path(target) as out:
                shutil.move(Path(tmp) / name, out)
    return xml_path


def read_ir(xml_path, info):
    """The backbone saved by :func:`save_ir`, as an ``openvino.Model`` (read directly:
    no Keras, no TensorFlow). A file that is unreadable, or that was saved for
    another backbone (its fingerprint), is a one-line :class:`FashionrecError`."""
    ov = _openvino()
    try:
        model = ov.Core().read_model(str(xml_path))
    except Exception as exc:  # OpenVINO raises RuntimeError with multi-line reasons
        raise FashionrecError(f"cannot read the backbone IR {xml_path} "
                              f"({short_reason(exc)[:200]})") from None
    tags = {}
    for key in _ir_tags(info):
        if model.has_rt_info([IR_SECTION, key]):
            tags[key] = model.get_rt_info([IR_SECTION, key]).astype(str)
    if tags.get("fingerprint") != info.fingerprint:
        raise FashionrecError(f"the backbone IR {xml_path} was saved for another backbone "
                              f"(fingerprint {tags.get('fingerprint')}, the run's is "
                              f"{info.fingerprint})")
    return model


IR_SECTION = "fashionrec"  # the IR's rt_info section that describes the backbone


def _ir_tags(info):
    return {"fingerprint": info.fingerprint, "image_size": str(info.image_size),
            "feature_dim": str(info.feature_dim), "pooling": info.pooling,
            "description": info.describe(public=True)}


def _convert(ov, model, image_size):
    """The Keras backbone as an ``openvino.Model`` taking ``(N, S, S, 3)`` batches."""
    import warnings

    with warnings.catch_warnings():  # Keras warns about the input's structure
        warnings.simplefilter("ignore")
        return ov.convert_model(model, input=[(-1, image_size, image_size, 3)])


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise FashionrecError(f"engine openvino: OpenVINO is not installed "
                              f"({OPENVINO_HINT})") from None
    return ov


def _mixed_bfloat16(model):
    """The same network under ``mixed_bfloat16`` (bf16 compute, float32 weights)."""
    import keras

    cfg = model.get_config()
    for layer in cfg["layers"]:
        if "dtype" in layer["config"] and layer["class_name"] != "InputLayer":
            layer["config"]["dtype"] = "mixed_bfloat16"
    try:
        clone = keras.Model.from_config(cfg, custom_objects=_custom_objects(model))
    except Exception as exc:
        raise FashionrecError(f"engine keras cannot run this backbone in bfloat16 "
                              f"({type(exc).__name__}); use --precision float32") from None
    clone.set_weights(model.get_weights())
    return clone


def _custom_objects(model):
    return {type(layer).__name__: type(layer) for layer in model.layers}
