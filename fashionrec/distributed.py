"""Feature extraction of a catalog on Ray Data: here in several processes, or across
the machines of a Ray cluster.

:class:`RayExtractor` is a *runner* for :meth:`ViewCache.extract
<fashionrec.extract.ViewCache.extract>` (and so for ``Recommender.extract_catalog`` and
``fashionrec extract --ray``): it computes the same ``(start, features, failed)`` row
ranges as :meth:`FeatureExtractor.iter_batches <fashionrec.extract.FeatureExtractor.iter_batches>`,
and the feature cache writes them as they come, so a killed extraction resumes.

How it runs:

* the image list (row, path) of the rows still to do goes into a Ray Dataset, one block
  per chunk of consecutive rows (the chunks lie on a grid of whole backbone batches, so
  each backbone call sees the same images as on one machine);
* ``map_batches`` runs each chunk through an actor pool: every actor rebuilds the
  backbone from its :class:`~fashionrec.extract.BackboneInfo` (so every node needs the
  backbone file at the same path) and reads and decodes the files itself with the
  package's own image code (:class:`~fashionrec.images.ImageFiles`), so features match
  the single-machine path;
* actors take a fractional share of the CPUs that leaves some free (an actor pool
  holding every CPU can stall a dataset, ray-project/ray#44687), and TensorFlow in
  each actor computes with that share's threads.

Example:
    >>> runner = RayExtractor(workers=2)                                   # doctest: +SKIP
    >>> Recommender(cfg).extract_catalog(catalog, cache_dir="runs/r/features",
    ...                                  runner=runner)                    # doctest: +SKIP
    >>> runner.close()                                                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings

import numpy as np
from tqdm.auto import tqdm

from .artifacts import short_reason
from .errors import FashionrecError

RAY_HINT = "pip install 'fashionrec[ray]'"
LOCAL_WORKERS = 2  # actors on a local Ray
CLUSTER_CPUS_PER_WORKER = 4  # a cluster: one actor per this many CPUs
MAX_CHUNK = 32  # images per Ray task at most (one progress/partial-file update each)
CHUNKS_PER_WORKER = 8  # at least this many chunks per actor when the catalog allows


def import_ray():
    """The ``ray`` module with Ray Data, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FashionrecError(f"extraction on Ray needs Ray Data: {RAY_HINT}") from None
    return ray


class RayExtractor:
    """Compute backbone features on Ray Data, one backbone per actor.

    Args:
        address: ``None`` starts a local Ray on this machine's CPUs (no dashboard);
            ``"auto"`` joins the cluster this machine belongs to (``ray start``),
            ``"ray://HOST:PORT"`` joins one through Ray Client. A Ray already started
            in this process is used as it is.
        workers: actors, one model each (default: 2 on a local Ray, a cluster's CPUs
            divided by 4, at least 1).
        verbose: let Ray's own log lines and the workers' output through.
        chunk_size: images per Ray task (default: 8 chunks per actor, at most 32
            images), rounded up to whole backbone batches.
        num_cpus: CPUs each actor reserves (default: the CPUs, less a reserve of a
            quarter CPU per core up to one, shared among the actors).
        threads: TensorFlow threads in each actor (default: its CPUs, rounded up; the
            OpenVINO engine picks its own).

    Connecting is lazy (when :meth:`iter_batches` has rows to compute, or
    :meth:`describe` on a cluster when the number of workers is not given);
    :meth:`close` shuts down a Ray this object started. Ray Data's own progress bars
    and log lines are turned off in this process unless ``verbose``.

    After each extraction :attr:`stats_` says how it went: ``images``, ``chunks``,
    ``compute_s`` (the actors' compute, summed), ``first_compute_s`` (from the start to
    the first chunk computed), ``actor_start_s`` (the slowest actor's backbone build)
    and ``wall_s``.
    """

    def __init__(self, address=None, workers=None, verbose=False, chunk_size=None,
                 num_cpus=None, threads=None):
        import_ray()
        if address in ("", "local"):
            address = None
        for name, value in (("workers", workers), ("chunk_size", chunk_size),
                            ("threads", threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise FashionrecError(f"Ray {name} must be a whole number >= 1, got {value!r}")
        if num_cpus is not None and not num_cpus > 0:
            raise FashionrecError(f"Ray num_cpus must be > 0, got {num_cpus!r}")
        self.address, self.workers, self.verbose = address, workers, bool(verbose)
        self.chunk_size, self.num_cpus, self.threads = chunk_size, num_cpus, threads
        self.info = self.batch_size = None  # set by prepare()
        self._connected = False
        self._started = False  # ray.init called by this object (so close shuts it down)
        self._cpus = self._node_cpus = None

    # ------------------------------------------------------------ the cluster
    @property
    def local(self):
        return self.address is None

    def connect(self):
        """Start the local Ray or join the cluster (once); a failure is one line."""
        if self._connected:
            return self
        ray = import_ray()
        if not ray.is_initialized():
            level = logging.INFO if self.verbose else logging.ERROR
            options = dict(include_dashboard=False, logging_level=level,
                           log_to_driver=self.verbose)
            try:
                with warnings.catch_warnings():  # Ray Client warns before it raises
                    if not self.verbose:
                        warnings.simplefilter("ignore")
                    if self.local:
                        ray.init(address="local", num_cpus=os.cpu_count() or 1, **options)
                    else:
                        ray.init(address=self.address, **options)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
                where = ("start a local Ray" if self.local
                         else f"join the Ray cluster at {self.address}")
                raise FashionrecError(f"cannot {where} ({short_reason(exc)})") from None
            self._started = True
        self._connected = True
        self._cpus = float(ray.cluster_resources().get("CPU", 0.0))
        nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        self._node_cpus = float(max(nodes, default=self._cpus))
        if self._cpus <= 0:
            self.close()
            raise FashionrecError("the Ray cluster has no CPUs to run the backbone on")
        if self.workers is None:
            self.workers = LOCAL_WORKERS if self.local else max(
                1, int(self._cpus) // CLUSTER_CPUS_PER_WORKER)
        self._quiet_ray_data()
        return self

    def _quiet_ray_data(self):
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts images
        ctx.print_on_execution_start = self.verbose
        ctx.enable_auto_log_stats = False
        ctx.log_internal_stack_trace = self.verbose
        if not self.verbose:
            logging.getLogger("ray.data").setLevel(logging.ERROR)

    def describe(self):
        """Where and with how many actors, e.g. ``"local, 2 workers"``."""
        if self.workers is None and self.local:
            workers = LOCAL_WORKERS
        else:
            if self.workers is None:
                self.connect()
            workers = self.workers
        where = "local" if self.local else self.address
        return f"{where}, {workers} worker{'s' if workers != 1 else ''}"

    def resources(self):
        """``(num_cpus, threads)`` of each actor: the cluster's CPUs less a reserve (a
        quarter CPU per core, at most one) shared among the actors, and no more than
        the largest node has less its reserve (so an actor fits somewhere)."""
        self.connect()
        free = lambda cpus: cpus - min(1.0, 0.25 * cpus)  # noqa: E731
        share = self.num_cpus or max(0.1, min(free(self._cpus) / self.workers,
                                              free(self._node_cpus)))
        threads = self.threads or max(1, math.ceil(share - 1e-9))
        return share, threads

    def prepare(self, info, batch_size):
        """Get ready to compute with the backbone ``info`` (engine and precision
        resolved), ``batch_size`` backbone inputs per call. Ray is started or joined
        when there is something to compute (a cached catalog needs no Ray)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FashionrecError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        self.info, self.batch_size = info, batch_size
        return self

    def close(self):
        """Shut down (or disconnect from) a Ray this object started."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
        self._connected = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ extraction
    def chunks(self, n_items, per_item, skip=None):
        """The row arrays of the Ray tasks: rows not in ``skip`` on a grid of
        ``chunk`` consecutive rows (whole backbone batches of ``per_item`` views each)."""
        todo = np.arange(n_items) if skip is None else np.flatnonzero(~np.asarray(skip))
        from .extract import items_per_call

        step = items_per_call(self.batch_size, per_item)
        if self.chunk_size:
            chunk = step * math.ceil(self.chunk_size / step)
        else:
            wanted = math.ceil(len(todo) / (self.workers * CHUNKS_PER_WORKER)) if len(todo) else 1
            chunk = step * min(max(1, math.ceil(wanted / step)), max(1, MAX_CHUNK // step))
        cells = todo // chunk
        cuts = np.flatnonzero(np.diff(cells)) + 1
        return [rows for rows in np.split(todo, cuts) if len(rows)]

    def iter_batches(self, images, progress=False, desc="extract", skip=None):
        """Yield ``(start, features, failed)`` for row ranges of ``images`` (anything
        with ``paths``, ``size`` and ``views``, like
        :class:`~fashionrec.images.ImageFiles`), in the order they finish; rows with
        ``skip`` set are not computed. ``failed`` maps rows whose file could not be
        decoded to the reason."""
        if self.info is None:
            raise FashionrecError("RayExtractor.prepare(info, batch_size) comes before "
                                  "iter_batches")
        ray = import_ray()
        import pandas as pd

        if not hasattr(images, "paths"):
            raise FashionrecError("extraction on Ray reads image files: give an ImageFiles "
                                  "(a catalog's images), not an array")
        paths = [str(p) for p in images.paths]
        views = getattr(images, "views", None)
        if not len(paths) or (skip is not None and np.asarray(skip).all()):
            return  # nothing to compute: no Ray needed
        self.connect()  # the default number of workers decides the chunks
        chunks = self.chunks(len(paths), len(views) if views else 1, skip)
        total = int(sum(len(rows) for rows in chunks))
        num_cpus, threads = self.resources()
        blocks = [pd.DataFrame({"row": rows.astype(np.int64),
                                "path": [paths[r] for r in rows]}) for rows in chunks]
        options = dict(
            batch_size=None, batch_format="numpy", num_cpus=num_cpus,
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, len(chunks))),
            fn_constructor_kwargs=dict(
                info=self.info.to_dict(), batch_size=self.batch_size, size=images.size,
                fit=getattr(images, "fit", "pad"), mirror=getattr(images, "mirror", False),
                views=views, threads=threads))
        source = ray.data.from_pandas(blocks)
        with warnings.catch_warnings():
            # max_restarts=0: Ray Data's default (restart forever) cannot work with the
            # actor arguments it keeps in the object store and says so on every start
            # (ray-project/ray#53727, #57733); a failed run resumes instead. Passing it
            # is deprecated in favour of named parameters that do not cover it yet.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                ds = source.map_batches(ChunkExtractor, max_restarts=0, **options)
            except TypeError:  # a Ray that no longer takes it
                ds = source.map_batches(ChunkExtractor, **options)
        t0 = time.time()
        stats = self.stats_ = {"images": 0, "chunks": 0, "compute_s": 0.0,
                               "first_compute_s": None, "actor_start_s": None,
                               "wall_s": None}
        with tqdm(total=total, unit="img", desc=desc, disable=not progress,
                  smoothing=0.1, dynamic_ncols=True) as bar:
            for batch in _ray_errors(ds.iter_batches(batch_size=None, batch_format="numpy")):
                errors = [e for e in batch["error"] if e]
                if errors:
                    raise FashionrecError(str(errors[0]))
                rows = np.asarray(batch["row"], dtype=np.int64)
                _account(stats, batch, t0)
                feats = np.asarray(batch["feats"], dtype=np.float32)
                failed = batch["failed"]
                for lo, hi in _runs(rows):
                    bad = {int(rows[i]): str(failed[i]) for i in range(lo, hi) if failed[i]}
                    yield int(rows[lo]), feats[lo:hi], bad
                bar.update(len(rows))
        stats["wall_s"] = time.time() - t0


def _account(stats, batch, t0):
    """Add a result batch (one or more chunks) to :attr:`RayExtractor.stats_`."""
    chunks = set(zip(batch["started"].tolist(), batch["seconds"].tolist(), strict=True))
    stats["images"] += len(batch["started"])
    stats["chunks"] += len(chunks)
    stats["compute_s"] += sum(d for _, d in chunks)
    first = min(s for s, _ in chunks) - t0
    stats["first_compute_s"] = min(first, stats["first_compute_s"] or first)
    for born, ready in set(zip(batch["born"].tolist(), batch["ready"].tolist(), strict=True)):
        stats["actor_start_s"] = max(ready - born, stats["actor_start_s"] or 0.0)


def _runs(rows):
    """``(lo, hi)`` index ranges of ``rows`` whose values are consecutive integers."""
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    bounds = [0, *cuts.tolist(), len(rows)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _ray_errors(batches):
    """``batches`` with an error from Ray turned into one line: a FashionrecError
    raised in a worker keeps its message."""
    try:
        yield from batches
    except FashionrecError:
        raise
    except Exception as exc:
        cause = _fashionrec_cause(exc)
        if cause is not None:
            raise FashionrecError(cause) from None
        raise FashionrecError(f"extraction on Ray failed ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None


def _fashionrec_cause(exc):
    """The message of a FashionrecError behind a Ray error, if any (a worker's
    exception comes back as a ``RayTaskError`` whose ``cause`` it is)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FashionrecError) and not hasattr(e, "cause"):
            return str(e)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def _first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def set_threads(threads):
    """TensorFlow's thread pools to ``threads`` (before it starts computing)."""
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except (ImportError, RuntimeError):  # not installed, or already running
        pass


class ChunkExtractor:
    """The Ray actor: one backbone, rebuilt from a :class:`BackboneInfo` dict; each call
    reads, decodes and computes one chunk of ``{"row", "path"}`` rows.

    Returns per row ``row``, ``feats`` (``(V, D)``, or ``(D,)`` without views),
    ``failed`` (why its file could not be decoded, else ``""``), ``error`` (a problem
    building the backbone on this worker, e.g. its file missing: sent back as data, so
    the driver raises it as one line, without Ray's traceback), and timings (``started``
    and ``seconds`` of the chunk, ``born`` and ``ready`` of the actor)."""

    def __init__(self, info, batch_size, size, fit="pad", mirror=False, views=None,
                 threads=None):
        self.born = time.time()
        from .extract import BackboneInfo

        self.info = BackboneInfo.from_dict(info)
        self.size, self.fit, self.mirror = size, fit, mirror
        self.views = None if views is None else [tuple(v) for v in views]
        self.error = ""
        self.extractor = None
        try:
            if threads:
                set_threads(threads)
            self.extractor = self._build(batch_size)
        except FashionrecError as exc:
            self.error = f"on Ray worker {_node()}: {exc}"
        except Exception as exc:  # noqa: BLE001 - everything goes back as one line
            self.error = (f"on Ray worker {_node()}: cannot build the backbone "
                          f"({type(exc).__name__}: {_first_line(exc)})")
        self.ready = time.time()

    def _build(self, batch_size):
        from .extract import FeatureExtractor, rebuild_backbone

        model = rebuild_backbone(self.info)
        return FeatureExtractor(model, self.info, batch_size, workers=1)

    def __call__(self, batch):
        from .images import ImageFiles

        rows = np.asarray(batch["row"], dtype=np.int64)
        paths = list(batch["path"])
        n = len(rows)
        failed = np.full(n, "", dtype=object)
        shape = (n, len(self.views), self.info.feature_dim) if self.views else (
            n, self.info.feature_dim)
        if self.error:
            return self._result(rows, np.zeros(shape, np.float32), failed, self.error, 0, 0)
        started = time.time()
        feats = np.empty(shape, np.float32)
        for lo, hi in _runs(rows):
            images = ImageFiles(paths[lo:hi], self.size, self.fit, self.mirror, self.views)
            for start, f, bad in self.extractor.iter_batches(images):
                feats[lo + start:lo + start + len(f)] = f
                for r, why in bad.items():
                    failed[lo + r] = why
        return self._result(rows, feats, failed, "", started, time.time() - started)

    def _result(self, rows, feats, failed, error, started, seconds):
        n = len(rows)
        return {"row": rows, "feats": feats, "failed": failed,
                "error": np.full(n, error, dtype=object),
                "started": np.full(n, float(started)), "seconds": np.full(n, float(seconds)),
                "born": np.full(n, self.born), "ready": np.full(n, self.ready)}


def _node():
    import socket

    return socket.gethostname()
