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

from .app import ServeSettings, create_app
from .state import RunWatcher

__all__ = ["RunWatcher", "ServeSettings", "create_app", "run"]


def run(settings, host="127.0.0.1", port=8000, log=print):
    """Load the run, then serve it until interrupted (uvicorn handles SIGINT/SIGTERM:
    it stops taking requests, finishes those in flight and returns)."""
    import uvicorn

    watcher = RunWatcher(settings.run_dir, settings.check_interval, log=log)
    app = create_app(settings, watcher=watcher, log=log)
    writes = "on (API key set)" if settings.api_key else "off (no API key)"
    log(f"fashionrec serve: http://{host}:{port}/  (run {settings.run_dir}: "
        f"{len(watcher.rec.index_)} items; API docs at /docs; writes {writes})")
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # a requested stop is not a crash: return normally (uvicorn would re-raise
            # the signal after its graceful shutdown, ending the process with it)
            getattr(self, "_captured_signals", []).clear()

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                          access_log=False)).run()
