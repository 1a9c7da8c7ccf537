"""``fashionrec serve``: the recommendation service (``pip install 'fashionrec[serve]'``).

* :func:`~fashionrec.serve.app.create_app` — the FastAPI app: a JSON API under ``/api``
  (recommend by item or photo, browse, add and remove, health, readiness, stats),
  Prometheus metrics at ``/metrics``, the web page at ``/``;
* :class:`~fashionrec.serve.state.RunWatcher` — the served run, swapped whole when it
  changes on disk;
* :class:`~fashionrec.serve.batcher.MicroBatcher` — photo queries that arrive together
  share one backbone call;
* :func:`run` — uvicorn on a host and port, stopped cleanly by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib

from .app import ServeSettings, create_app
from .state import RunWatcher

__all__ = ["RunWatcher", "ServeSettings", "app_from_env", "create_app", "run",
           "uvicorn_options"]


def _one_thread_per_request():
    """Many requests at once, each a small search: one BLAS / OpenMP thread per request
    beats every request spawning threads for every core (measured here: 331 against 70
    requests/s at 8 concurrent item queries on 2 cores)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass


def app_from_env():
    """The app of one worker process (``--workers N``): settings from the environment."""
    import json
    import os

    _one_thread_per_request()
    return create_app(ServeSettings(**json.loads(os.environ[_SETTINGS_VAR])))


_SETTINGS_VAR = "FASHIONREC_SERVE_SETTINGS"


@contextlib.contextmanager
def _metrics_folder():
    """``PROMETHEUS_MULTIPROC_DIR`` for the workers (set before they start, so their
    metrics are written there and summed by every scrape): the one given, else a
    fresh temporary folder removed at the end."""
    import os
    import shutil
    import tempfile

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    folder = tempfile.mkdtemp(prefix="fashionrec-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(folder, ignore_errors=True)


def uvicorn_options(settings, host="127.0.0.1", port=8000):
    """The keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` for ``settings``:
    from ``settings.max_connections`` open connections (or requests in flight) on, a
    process answers new requests 503 itself."""
    return dict(host=host, port=port, log_level="warning", access_log=False,
                limit_concurrency=settings.max_connections)


def run(settings, host="127.0.0.1", port=8000, workers=1, log=print):
    """Load the run, then serve it until interrupted (uvicorn handles SIGINT/SIGTERM:
    it stops taking requests, finishes those in flight and returns).

    With ``workers`` > 1, that many processes serve the same port, each with its own
    model, batcher and metrics; a write made through one is seen by the others as any
    change on disk is (within ``settings.check_interval``)."""
    import dataclasses
    import json
    import os

    import uvicorn

    _one_thread_per_request()
    watcher = RunWatcher.from_settings(settings, log=log)
    writes = "on (API key set)" if settings.api_key else "off (no API key)"
    log(f"fashionrec serve: http://{host}:{port}/  (run {settings.run_dir}: "
        f"{watcher.rec.stats()['items']} items; {workers} worker(s); API docs at /docs; "
        f"writes {writes})")
    config = uvicorn_options(settings, host, port)
    if workers > 1:
        del watcher  # checked that it loads; each worker loads its own
        os.environ[_SETTINGS_VAR] = json.dumps(dataclasses.asdict(settings))
        with _metrics_folder():
            uvicorn.run("fashionrec.serve:app_from_env", factory=True, workers=workers,
                        **config)
        return
    app = create_app(settings, watcher=watcher, log=log)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # a requested stop is not a crash: return normally (uvicorn would re-raise
            # the signal after its graceful shutdown, ending the process with it)
            getattr(self, "_captured_signals", []).clear()

    Server(uvicorn.Config(app, **config)).run()
