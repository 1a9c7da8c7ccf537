"""The run a service serves: loaded once, warmed, and swapped whole when it changes.

:class:`RunWatcher` holds a loaded :class:`~fashionrec.recommend.Recommender`. Every
query asks it for the current one; at most every ``check_interval`` seconds that
looks at the run's record and its catalog's manifest (two ``stat`` calls):

* the index changed (an ``add`` / ``remove`` / ``compact`` by the CLI or another
  process): the live index is loaded and swapped in; queries already running keep
  the index they started with (``Recommender.recommend`` takes one snapshot);
* the run was retrained in place: the new run is loaded only once it is complete
  (``Recommender.load`` refuses a half-saved run), warmed, then swapped in whole;
  until then the old one answers.

A catalog in a Milvus server is asked whether it answers at every look as well: while
it does not, ``/api/ready`` says so (routes that need it answer 503), and once it
answers again the service is ready again by itself.

Writes made through the service (add, remove) and reloads are serialised by one lock.
A write that leaves the catalog past the compaction rules (see
:func:`fashionrec.living.compaction_due`) starts a compaction in a background thread
under that lock: queries go on with the snapshot they hold, writes wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from .. import living
from ..errors import FashionrecError, StoreUnavailable
from ..recommend import Recommender
from ..rundir import RunDir


class RunWatcher:
    """A served run that follows changes on disk.

    Args:
        run_dir: the trained run.
        check_interval: seconds between looks at the files.
        log: where reloads are reported.
        compact_segments, compact_removed_share: when a write starts a compaction
            (:func:`fashionrec.living.compaction_due`; ``0`` turns a rule off).
    """

    def __init__(self, run_dir, check_interval=0.5, log=None,
                 compact_segments=living.COMPACT_SEGMENTS,
                 compact_removed_share=living.COMPACT_REMOVED_SHARE):
        self.run_dir = Path(run_dir)
        self.check_interval = check_interval
        self.log = log or (lambda *_: None)
        self.compact_rules = (compact_segments, compact_removed_share)
        self.write_lock = threading.Lock()  # held by writes, reloads and compactions
        self._compacting = threading.Lock()  # one background compaction at a time
        self._stamps = self._read_stamps()
        self.rec = self._load()
        self._last_check = time.monotonic()
        self.ready = False
        self.photo_error = None  # why photo queries cannot be answered, if they cannot
        self.store_error = None  # why the catalog's store does not answer, while it does not

    def _load(self):
        rec = Recommender.load(self.run_dir, log=self.log)
        rec.lock_wait = 30.0  # a write waits for one by another worker or the CLI
        rec.auto_compact = False  # compactions run in the background (after_write)
        rec.compact_segments, rec.compact_removed_share = self.compact_rules
        return rec

    @classmethod
    def from_settings(cls, settings, log=None):
        """The watcher of a :class:`~fashionrec.serve.app.ServeSettings`' run."""
        return cls(settings.run_dir, settings.check_interval, log,
                   settings.compact_segments, settings.compact_removed_share)

    def _read_stamps(self):
        return RunDir(self.run_dir).stamps()

    def warm(self):
        """Build the backbone and run one query through every stage, so the first
        user does not pay for it; then the service is ready. A run whose backbone
        cannot be rebuilt here (copied without it) still serves item queries."""
        self.photo_error = warm_up(self.rec)
        if self.photo_error:
            self.log(f"serve: photo queries are unavailable ({self.photo_error}); item "
                     f"queries are served")
        self.ready = True

    def watch(self):
        """Look for changes in a background thread as well (every ``check_interval``
        seconds, at least 0.1 s), so the async routes, which never reload on the
        event loop, see them too; :meth:`stop` ends it."""
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.probe_interval):
                try:
                    self.current()
                except Exception:  # noqa: BLE001 - logged; the next look tries again
                    logging.getLogger("fashionrec.serve").exception("reload failed")
                self.check_store()
        threading.Thread(target=loop, name="fashionrec-watch", daemon=True).start()

    @property
    def probe_interval(self):
        """Seconds between the background thread's looks."""
        return max(self.check_interval, 0.1)

    def check_store(self):
        """Ask a catalog kept in a server (Milvus) whether it answers: remember why
        not (for ``/api/ready``), and forget it once it answers again."""
        index = self.rec.index_
        if not getattr(index, "remote", False):
            return
        try:
            index.ping()
        except StoreUnavailable as exc:
            if self.store_error is None:
                self.log(f"serve: not ready: {exc}")
            self.store_error = exc.public
            return
        if self.store_error is not None:
            self.log("serve: the catalog's store answers again: ready")
        self.store_error = None

    def stop(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()

    def current(self, reload=True):
        """The recommender to answer with; with ``reload``, reloaded first if its files
        changed (the async routes pass ``False``: a reload, which can load a model,
        never runs on the event loop; the watching thread does it)."""
        now = time.monotonic()
        if reload and now - self._last_check >= self.check_interval:
            self._last_check = now
            stamps = self._read_stamps()
            # reloads and writes exclude each other: a reload can never put back an
            # index older than a write this service just made
            if stamps != self._stamps and self.write_lock.acquire(blocking=False):
                try:
                    self._reload(self._read_stamps())
                finally:
                    self.write_lock.release()
        return self.rec

    def _reload(self, stamps):
        rec = self.rec
        try:
            run_id = RunDir(self.run_dir).run_id()
            if run_id != rec.run_id_:  # retrained: swap in the whole new run once complete
                new = self._load()
                photo_error = warm_up(new)
                self.rec, self.photo_error = new, photo_error
                self.log(f"serve: switched to run {new.run_id_} ({new.stats()['items']} items)")
                if photo_error:  # the full reason for the operator; clients get none
                    self.log(f"serve: photo queries are unavailable ({photo_error})")
            else:
                stats = rec.refresh(log=self.log).stats()
                self.log(f"serve: index generation {stats['index']['generation']} "
                         f"({stats['items']} items)")
        except FashionrecError as exc:  # half-written: try again at the next look
            self.log(f"serve: not reloaded yet ({exc})")
            return
        self._stamps = stamps

    def after_write(self, rec, run_id):
        """Note the files as they are after a write this service made itself through
        ``rec`` (held under ``write_lock``); ``run_id`` is the version ``rec`` had
        before. A write that met a retrain was redone on the new version, which ``rec``
        now holds: it is warmed and announced as a reload would."""
        if rec.run_id_ != run_id:
            self.photo_error = warm_up(rec)
            self.log(f"serve: switched to run {rec.run_id_} (a write met the retrain)")
        if rec.refresh_error:  # the write is saved; the next look reads it
            self.log(f"serve: a write was saved but reading the catalog back failed "
                     f"({rec.refresh_error}); trying again")
        else:
            self._stamps = self._read_stamps()
        self.compact_if_due()

    def compact_if_due(self):
        """Compact the served catalog in a background thread if it is past the rules
        (one compaction at a time, under ``write_lock``); returns the thread, or
        ``None`` when none was started."""
        try:
            due = self.rec.compaction_due()
        except (FashionrecError, OSError):
            return None
        if not due or not self._compacting.acquire(blocking=False):
            return None

        def compact():
            try:
                with self.write_lock:
                    rec = self.rec
                    if rec.compaction_due():  # not done by another process meanwhile
                        self.log(f"serve: compacting the catalog ({due})")
                        rec.compact(progress=False, log=None)
                        self.log(f"serve: compacted ({rec.stats()['items']} items)")
                    if not rec.refresh_error:
                        self._stamps = self._read_stamps()
            except (FashionrecError, OSError) as exc:  # the index is whole: the old or
                self.log(f"serve: compaction failed ({exc}); the next write tries again")
            finally:  # the new one (a compaction is atomic)
                self._compacting.release()
        thread = threading.Thread(target=compact, name="fashionrec-compact", daemon=True)
        thread.start()
        return thread


def warm_up(rec):
    """One item query and one photo query through every stage (this builds the
    backbone and compiles what Keras compiles lazily). Returns why photo queries fail
    (e.g. the backbone file is gone: the reason may name server paths, so it is for the
    log only), or ``None``."""
    total, first = rec.browse(0, 1)
    if total > 1:
        rec.recommend(item=first[0].id, k=1)
    if rec.is_catalog:
        image = np.full((rec.config.image_size, rec.config.image_size, 3), 255, np.uint8)
    else:
        image = np.zeros(rec.image_shape, np.float32)
    try:
        result = rec.recommend_batch([{"query": image, "k": 1}])[0]
        if not isinstance(result, FashionrecError):
            # a second batch size: Keras then traces the model for any batch size, so
            # the first batch of each new size under load does not stall the queue
            rec.recommend_batch([{"query": image, "k": 1}] * 3)
    except FashionrecError as exc:
        return str(exc)
    return str(result) if isinstance(result, FashionrecError) else None
