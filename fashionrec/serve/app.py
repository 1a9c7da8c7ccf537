"""The HTTP service: a FastAPI app over a trained run (``fashionrec serve``).

Every route calls the library's public API (:class:`~fashionrec.recommend.Recommender`
through a :class:`~fashionrec.serve.state.RunWatcher`) and only turns HTTP into calls
and answers into JSON; the routes live in :mod:`fashionrec.serve.routers`. This module
composes the app: settings, middlewares, error handlers, the routers and the page.
Errors are ``{"error": "one sentence"}`` with a 4xx status (503 / 504 for a photo
query the service is too busy or too slow for); an unexpected failure is logged with a
request id and answered 500 with that id only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, images, living
from ..errors import StoreUnavailable
from .batcher import MicroBatcher
from .context import ApiError, Context, json_error, n_items, store_down
from .routers import ROUTERS
from .state import RunWatcher

__all__ = ["ApiError", "BodyLimit", "RequestContext", "ServeSettings", "create_app"]

STATIC = Path(__file__).resolve().parent / "static"
logger = logging.getLogger("fashionrec.serve")


@dataclass
class ServeSettings:
    """What a service is allowed and how it batches.

    Args:
        run_dir: the trained run to serve.
        api_key: writes (add, remove) need ``Authorization: Bearer <api_key>``; without
            one, writes are off.
        cors_origins: origins allowed to call the API from a browser (none: no CORS).
        max_upload_bytes: largest request body (413 above, chunked bodies too).
        max_batch, max_wait_ms: photo queries answered together (see
            :class:`~fashionrec.serve.batcher.MicroBatcher`).
        max_k: largest ``k`` a query may ask for.
        check_interval: seconds between looks for changes to the run on disk.
        max_queue: photo queries waiting for a batch; beyond, 503 with ``Retry-After``.
        photo_timeout_s: longest a photo query waits for its answer (504 after).
        max_pixels: width x height of an uploaded photo, read from its header (413
            above); the library's own budget (:data:`fashionrec.images.MAX_PIXELS`)
            still applies to decoding, so more than that has no effect.
        max_connections: uvicorn's ``limit_concurrency``: from this many open
            connections or requests in flight, new requests get 503.
        compact_segments, compact_removed_share: a write that leaves this many added
            segments, or this share of removed items, unfolded starts a background
            compaction (``0`` turns a rule off).
        display_cache_bytes: encoded item pictures kept in memory for the image route.
    """

    run_dir: str
    api_key: str | None = None
    cors_origins: tuple = field(default_factory=tuple)
    max_upload_bytes: int = 10 * 2**20
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_k: int = 100
    check_interval: float = 0.5
    max_queue: int = 64
    photo_timeout_s: float = 30.0
    max_pixels: int = 40_000_000
    max_connections: int = 256
    compact_segments: int = living.COMPACT_SEGMENTS
    compact_removed_share: float = living.COMPACT_REMOVED_SHARE
    display_cache_bytes: int = 64 * 2**20


class _Metrics:
    """The service's Prometheus metrics. Under ``--workers N`` (``PROMETHEUS_MULTIPROC_DIR``
    set by :func:`fashionrec.serve.run`), every worker writes its values into that
    folder and a scrape, whichever worker answers it, reads all of them: counters and
    histograms summed, the item count the largest among live workers, the photo queue
    summed over live workers (:meth:`exposition`)."""

    def __init__(self):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        self.requests = Counter("fashionrec_requests", "HTTP requests",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("fashionrec_request_seconds", "HTTP request latency",
                                 ["route", "method"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5, 10))
        self.items = Gauge("fashionrec_items", "Items in the served index",
                           registry=self.registry, multiprocess_mode="livemax")
        self.queue = Gauge("fashionrec_photo_queue", "Photo queries waiting for a batch",
                           registry=self.registry, multiprocess_mode="livesum")
        self.batch = Histogram("fashionrec_photo_batch_size", "Photo queries per backbone call",
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))

    def exposition(self, items, queue):
        """The text a scrape gets, after setting this process's gauges (``items``, the
        photo ``queue``; ``items=None``: as last set)."""
        from prometheus_client import generate_latest, multiprocess

        if items is not None:
            self.items.set(items)
        self.queue.set(queue)
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def close(self):
        """This worker's live gauges leave the totals (multiprocess mode)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


class BodyLimit:
    """ASGI middleware: a request whose body exceeds ``limit`` bytes gets 413, told by
    its Content-Length or counted while the body streams in (chunked uploads). Once a
    streamed body is over the limit, the 413 is the answer whatever the app makes of
    the interrupted body (a form parser would call it a 400)."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the upload is larger than the limit of {self.limit:,} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await json_error(413, message)(scope, receive, send)
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                over = True
                raise ApiError(413, message)
            return event

        async def unless_over(event):
            nonlocal started
            if over and not started:  # the app's answer to a cut body: replaced below
                return
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await json_error(413, message)(scope, receive, send)


class RequestContext:
    """ASGI middleware: a request id on every answer (``X-Request-ID``), metrics per
    route, and any failure nobody handled logged with that id and answered 500 with
    the id only (a plain ASGI middleware: cheaper than Starlette's ``BaseHTTPMiddleware``
    on every request)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:12]
        started, status = False, 500
        t = time.perf_counter()

        async def send_with_id(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - logged in full, answered with an id only
            if isinstance(exc, ApiError):
                response = json_error(exc.status, exc.message, exc.headers)
            else:
                logger.error("request %s %s %s failed", rid, scope.get("method"),
                             scope.get("path"), exc_info=exc)
                response = json_error(500, f"internal error (request id {rid})", request_id=rid)
            if started:
                raise
            await response(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "-")
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - t)
            self.metrics.requests.labels(route, method, str(status)).inc()


def add_error_handlers(app):
    """Every error answered as ``{"error": "one sentence"}``."""

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return json_error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_error(request, exc):  # raised outside a route's own error handling
        down = store_down(exc)
        return json_error(down.status, down.message, down.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        message = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404 and message == "Not Found":
            message = f"there is no {request.url.path} here"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return json_error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return json_error(422, f"{where}: {first.get('msg', 'invalid value')}")


def create_app(settings, watcher=None, log=None):
    """The FastAPI app serving ``settings.run_dir``.

    Args:
        settings: a :class:`ServeSettings`.
        watcher: an already loaded :class:`RunWatcher` (default: load the run now).
        log: where loading and reloading are reported.

    The model is warmed in a background thread after start; ``/api/ready`` says yes
    once it is, and the routes that need it answer 503 until then.
    """
    say = log or (lambda message: logger.info(message))
    watcher = watcher or RunWatcher.from_settings(settings, log=say)
    if settings.max_pixels > images.MAX_PIXELS:
        say(f"serve: photos above the library's budget of {images.MAX_PIXELS:,} pixels "
            f"are refused whatever max_pixels says")
    metrics = _Metrics()
    batcher = MicroBatcher(lambda requests: watcher.current(False).recommend_batch(requests),
                           settings.max_batch, settings.max_wait_ms / 1e3,
                           on_batch=metrics.batch.observe, max_queue=settings.max_queue)

    def warm():
        try:
            watcher.warm()
            say(f"serve: ready ({n_items(watcher.rec)} items)")
        except Exception:  # noqa: BLE001 - reported; /api/ready stays no
            logger.exception("warming the model failed")

    async def lifespan(app):
        threading.Thread(target=warm, name="fashionrec-warm", daemon=True).start()
        watcher.watch()
        yield
        watcher.stop()
        batcher.close()
        metrics.close()

    app = FastAPI(title="fashionrec", version=__version__, lifespan=lifespan,
                  description="Visually similar products: recommend by item id or by photo, "
                              "browse the catalog, add and remove products.")
    app.state.watcher, app.state.batcher, app.state.settings = watcher, batcher, settings
    app.state.context = Context(settings, watcher, metrics, batcher)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(RequestContext, metrics=metrics)  # outermost: sees every answer
    return app
