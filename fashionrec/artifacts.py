"""Small helpers shared by every stage that writes or reads an artefact.

* atomic writes: a file is written under a temporary name beside its target and
  renamed over it only when complete, so an interrupted run never leaves a
  half-written file that a later command trusts;
* run metadata: which versions and when;
* StandardScaler parameters as plain arrays (no pickle anywhere).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib
import json
import os
import platform
import tempfile
import time
from importlib import metadata as _im
from pathlib import Path

import numpy as np
from sklearn.preprocessing import StandardScaler

from .errors import FashionrecError

_PACKAGES = ("fashionrec", "keras", "numpy", "scikit-learn", "scipy", "h5py", "openvino")


@contextlib.contextmanager
def atomic_path(target, suffix=None):
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    ``suffix`` keeps an extension that a writer insists on (Keras wants ``.keras``).
    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        _fsync(tmp)  # the bytes are on disk before the name points at them
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def flocked(path, wait=0.0, busy="another process holds the lock"):
    """An exclusive ``flock`` on ``path`` (created), waiting at most ``wait`` seconds;
    past that, a :class:`FashionrecError` saying ``busy``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FashionrecError(f"{busy} (lock {path})") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a folder on a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask():
    """The process umask, read without changing it (``os.umask`` sets it, which races
    with other threads creating files); where ``/proc`` cannot tell, the usual 022."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_json(path, obj):
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path, what="file"):
    """Read JSON, turning a missing or corrupt file into a one-line error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FashionrecError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise FashionrecError(f"{what} {path} is unreadable or corrupt ({exc})") from None


def package_versions():
    """Versions of the packages that shape a run's numbers."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = _im.version(name)
        except _im.PackageNotFoundError:
            out[name] = None
    import keras

    out["keras_backend"] = keras.backend.backend()
    backend = importlib.import_module(out["keras_backend"])  # tensorflow, torch or jax
    out[out["keras_backend"]] = getattr(backend, "__version__", None)
    return out


def cpu_info():
    """``(model name, flags)`` of this machine's CPU (``/proc/cpuinfo`` on Linux; the
    flags are empty elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return model, flags


def cpu_description():
    """This machine's CPU for benchmark records: model, cores and the vector/matrix
    extensions that decide float32/bf16 speed."""
    model, flags = cpu_info()
    wanted = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
              "amx_tile": "AMX"}
    have = [name for flag, name in wanted.items() if flag in flags]
    return f"{model}, {os.cpu_count()} cores" + (f" ({', '.join(have)})" if have else "")


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file (``hashlib`` algorithm name), read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path):
    """SHA-256 of a file."""
    return file_digest(path, "sha256")


def short_reason(exc):
    """The gist of an exception on one line (Keras's fetch errors end in `-- reason`)."""
    text = " ".join(str(exc).split())
    return text.split(" -- ")[-1].strip() or type(exc).__name__


def peak_rss_mb():
    """Peak resident memory of this process in MB (Linux ``VmHWM``).

    ``getrusage``'s ``ru_maxrss`` is not used where ``VmHWM`` exists: on Linux it
    survives ``exec`` and so reports the parent's peak for a freshly started child.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now_iso():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def scaler_to_arrays(scaler):
    """The fitted state of a StandardScaler as float64 arrays."""
    return {
        "mean": np.asarray(scaler.mean_, dtype=np.float64),
        "scale": np.asarray(scaler.scale_, dtype=np.float64),
        "var": np.asarray(scaler.var_, dtype=np.float64),
        "n_samples_seen": np.asarray(scaler.n_samples_seen_, dtype=np.int64),
    }


def scaler_from_arrays(arrays):
    """Rebuild a fitted StandardScaler from :func:`scaler_to_arrays` output."""
    scaler = StandardScaler()
    scaler.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
    scaler.scale_ = np.asarray(arrays["scale"], dtype=np.float64)
    scaler.var_ = np.asarray(arrays["var"], dtype=np.float64)
    scaler.n_samples_seen_ = int(np.asarray(arrays["n_samples_seen"]))
    scaler.n_features_in_ = scaler.mean_.shape[0]
    return scaler
