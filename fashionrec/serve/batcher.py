"""Micro-batching: photo queries that arrive within a few milliseconds of each other
share one backbone call.

One worker thread takes the first waiting request, then gathers more until the batch
is full (``max_batch``) or ``max_wait_s`` has passed since the first, and answers
them all with one call of ``run_batch``. While that call computes, new requests
queue up and form the next batch, so under load batches grow by themselves and an
idle service answers a lone request after at most ``max_wait_s``.

At most ``max_queue`` requests wait: :meth:`MicroBatcher.submit` refuses more with
:class:`QueueFull` (the service answers 503, try again shortly). A request whose
future was cancelled before its batch ran (its client timed out or left) is skipped.
When a whole batch call fails, its requests are run again one by one, so a request
that breaks the call (a huge image: ``MemoryError``) fails alone. Nothing a request
or ``run_batch`` does stops the worker thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError

_STOP = object()
logger = logging.getLogger("fashionrec.serve")


class QueueFull(RuntimeError):
    """The batcher holds as many waiting requests as it may (or is closed)."""


class MicroBatcher:
    """Answer requests in batches with ``run_batch(list of requests) -> list of
    results`` (one per request, in order; an exception stands for a failed request).

    Args:
        run_batch: the batched computation.
        max_batch: most requests in one call.
        max_wait_s: longest a request waits for others to join it.
        on_batch: optional callback with each batch's size (metrics).
        max_queue: most requests waiting for a batch; more are refused (:class:`QueueFull`).

    Example:
        >>> b = MicroBatcher(lambda reqs: [r * 2 for r in reqs])
        >>> b.submit(21).result(timeout=5)
        42
        >>> b.close()
    """

    def __init__(self, run_batch, max_batch=16, max_wait_s=0.005, on_batch=None,
                 max_queue=64):
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self._closed = False
        self._queue = queue.Queue(maxsize=self.max_queue)
        self._thread = threading.Thread(target=self._loop, name="fashionrec-batcher",
                                        daemon=True)
        self._thread.start()

    def submit(self, request):
        """Queue ``request``; a Future of its result. Raises :class:`QueueFull` when
        ``max_queue`` requests already wait (or the batcher is closed)."""
        if self._closed:
            raise QueueFull("the photo queue is closed: the service is stopping")
        future = Future()
        try:
            self._queue.put_nowait((request, future))
        except queue.Full:
            raise QueueFull(f"the photo queue is full ({self.max_queue} requests "
                            f"waiting)") from None
        return future

    def pending(self):
        """How many requests wait for a batch (roughly: others may be adding)."""
        return self._queue.qsize()

    def close(self, timeout=10):
        """Answer what is queued, then stop the worker."""
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:  # the worker is stuck in a call: leave it (a daemon thread)
            return
        self._thread.join(timeout)

    def _loop(self):
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._gather(first)
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - the worker must never die
                logger.exception("the photo batcher failed a batch of %d", len(batch))
                for _, future in batch:
                    _settle(future, _as_exception(exc))

    def _gather(self, first):
        """``first`` and the requests that join it within ``max_wait_s``; whether a
        stop came meanwhile."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, batch):
        """Answer every request of ``batch`` still wanted: one call, or one call per
        request when the batch call fails."""
        live = [(request, future) for request, future in batch
                if future.set_running_or_notify_cancel()]  # False: cancelled, skip it
        if not live:
            return
        requests = [request for request, _ in live]
        try:
            results = self._call(requests)
        except BaseException as exc:  # noqa: BLE001 - answered per request below
            if len(live) > 1:
                logger.warning("a photo batch of %d failed (%s); answering its requests "
                               "one by one", len(live), _reason(exc))
                results = [self._one(request) for request in requests]
            else:
                results = [_as_exception(exc)]
        if self.on_batch:
            try:
                self.on_batch(len(live))
            except Exception:  # noqa: BLE001 - metrics never fail a query
                logger.exception("the photo batch callback failed")
        for (_, future), result in zip(live, results, strict=True):
            _settle(future, result)

    def _call(self, requests):
        results = self.run_batch(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"run_batch gave {len(results)} results for "
                               f"{len(requests)} requests")
        return results

    def _one(self, request):
        """The result of ``request`` alone, or its exception."""
        try:
            return self._call([request])[0]
        except BaseException as exc:  # noqa: BLE001 - this request's own failure
            return _as_exception(exc)


def _reason(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def _as_exception(exc):
    """``exc`` as an exception a request may carry (an ``Exception``: a thread's
    ``SystemExit`` or ``KeyboardInterrupt`` is not rethrown into the event loop)."""
    if isinstance(exc, Exception):
        return exc
    return RuntimeError(f"the photo query was interrupted ({type(exc).__name__})")


def _settle(future, result):
    """Give ``future`` its result (an exception: its failure) unless it is settled
    already or was cancelled."""
    if future.done():
        return
    try:
        if isinstance(result, BaseException):
            future.set_exception(_as_exception(result))
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled meanwhile: nobody waits for it
        pass
