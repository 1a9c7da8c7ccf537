"""Micro-batching: photo queries that arrive within a few milliseconds of each other
share one backbone call.

One worker thread takes the first waiting request, then gathers more until the batch
is full (``max_batch``) or ``max_wait_s`` has passed since the first, and answers
them all with one call of ``run_batch``. While that call computes, new requests
queue up and form the next batch, so under load batches grow by themselves and an
idle service answers a lone request after at most ``max_wait_s``.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

_STOP = object()


class MicroBatcher:
    """Answer requests in batches with ``run_batch(list of requests) -> list of
    results`` (one per request, in order; an exception stands for a failed request).

    Args:
        run_batch: the batched computation.
        max_batch: most requests in one call.
        max_wait_s: longest a request waits for others to join it.
        on_batch: optional callback with each batch's size (metrics).

    Example:
        >>> b = MicroBatcher(lambda reqs: [r * 2 for r in reqs])
        >>> b.submit(21).result(timeout=5)
        42
        >>> b.close()
    """

    def __init__(self, run_batch, max_batch=16, max_wait_s=0.005, on_batch=None):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.on_batch = on_batch
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="fashionrec-batcher",
                                        daemon=True)
        self._thread.start()

    def submit(self, request):
        """Queue ``request``; a Future of its result."""
        future = Future()
        self._queue.put((request, future))
        return future

    def close(self, timeout=10):
        """Answer what is queued, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self):
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
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
                    stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch):
        requests = [request for request, _ in batch]
        try:
            results = self.run_batch(requests)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch gave {len(results)} results for "
                                   f"{len(batch)} requests")
        except BaseException as exc:  # the whole call failed: every request fails with it
            results = [exc] * len(batch)
        if self.on_batch:
            self.on_batch(len(batch))
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
