"""The photo micro-batcher on its own (a fake ``run_batch``, no model): a bounded queue,
cancelled and timed-out requests skipped, per-request failures, and a worker thread
that survives whatever a request or a batch does."""

import asyncio
import threading
import time

import pytest

from fashionrec.serve.batcher import MicroBatcher, QueueFull


class Gate:
    """A ``run_batch`` that records its calls and holds each one until released."""

    def __init__(self, answer=lambda r: r * 10):
        self.calls, self.answer = [], answer
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, requests):
        self.calls.append(list(requests))
        self.started.set()
        assert self.release.wait(10), "the test never released the batch"
        return [self.answer(r) for r in requests]


@pytest.fixture
def gated():
    """A batcher answering one request per call, each held until the test releases it."""
    gate = Gate()
    batcher = MicroBatcher(gate, max_batch=1, max_wait_s=0, max_queue=2)
    yield gate, batcher
    gate.release.set()
    batcher.close()


def test_cancelled_requests_are_skipped_and_the_worker_keeps_answering(gated):
    gate, b = gated
    first = b.submit(1)
    assert gate.started.wait(5)  # the worker holds request 1
    queued = b.submit(2)
    later = b.submit(3)
    assert queued.cancel()  # its client left while it waited
    assert not first.cancel()  # running: too late to cancel, it is answered
    gate.release.set()
    assert first.result(timeout=5) == 10 and later.result(timeout=5) == 30
    assert queued.cancelled()
    assert b.submit(4).result(timeout=5) == 40  # the worker is alive
    assert [r for call in gate.calls for r in call] == [1, 3, 4]  # 2 never ran


def test_a_full_queue_refuses_with_a_clear_error(gated):
    gate, b = gated
    running = b.submit(1)
    assert gate.started.wait(5)
    waiting = [b.submit(2), b.submit(3)]
    assert b.pending() == 2
    with pytest.raises(QueueFull, match=r"photo queue is full \(2 requests waiting\)"):
        b.submit(4)
    gate.release.set()
    assert [f.result(timeout=5) for f in [running, *waiting]] == [10, 20, 30]
    assert b.submit(5).result(timeout=5) == 50  # room again
    b.close()
    with pytest.raises(QueueFull, match="closed"):
        b.submit(6)


def test_a_request_that_times_out_is_dropped_and_the_worker_survives(gated):
    gate, b = gated

    async def ask(request, timeout):
        return await asyncio.wait_for(asyncio.wrap_future(b.submit(request)), timeout)

    held = b.submit(1)
    assert gate.started.wait(5)
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(ask(2, 0.05))  # waits in the queue past its timeout: cancelled
    gate.release.set()
    assert held.result(timeout=5) == 10
    assert asyncio.run(ask(3, 5)) == 30
    assert [r for call in gate.calls for r in call] == [1, 3]


@pytest.mark.parametrize("error", [RuntimeError("boom"), MemoryError()])
def test_one_failing_request_fails_only_itself(error):
    calls = []

    def run(requests):
        calls.append(list(requests))
        if "bad" in requests:  # the whole call fails, as a huge image would make it
            raise error
        time.sleep(0.01)
        return [r * 2 for r in requests]

    b = MicroBatcher(run, max_batch=8, max_wait_s=0.2)
    futures = [b.submit(r) for r in (1, "bad", 2, 3)]
    assert futures[0].result(timeout=5) == 2
    with pytest.raises(type(error)):
        futures[1].result(timeout=5)
    assert [f.result(timeout=5) for f in futures[2:]] == [4, 6]
    assert calls[0] == [1, "bad", 2, 3] and calls[1:] == [[1], ["bad"], [2], [3]]
    assert b.submit(5).result(timeout=5) == 10  # the worker is alive
    b.close()


def test_nothing_a_batch_does_stops_the_worker():
    def run(requests):
        if requests == ["interrupt"]:
            raise KeyboardInterrupt
        if requests == ["short"]:
            return []  # fewer results than requests
        return [r.upper() for r in requests]

    sizes = []

    def on_batch(n):
        sizes.append(n)
        raise ValueError("a broken metrics callback")

    b = MicroBatcher(run, max_batch=1, max_wait_s=0, on_batch=on_batch)
    with pytest.raises(RuntimeError, match="interrupted"):
        b.submit("interrupt").result(timeout=5)
    with pytest.raises(RuntimeError, match="0 results for 1 requests"):
        b.submit("short").result(timeout=5)
    assert b.submit("ok").result(timeout=5) == "OK"
    assert sizes == [1, 1, 1] and b._thread.is_alive()
    b.close()
    assert not b._thread.is_alive()


def test_settings_are_checked():
    with pytest.raises(ValueError):
        MicroBatcher(lambda r: r, max_queue=0)
