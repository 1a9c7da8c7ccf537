"""The HTTP service: a FastAPI app over a trained run (``fashionrec serve``).

Every route calls the library (:class:`~fashionrec.recommend.Recommender` through a
:class:`~fashionrec.serve.state.RunWatcher`); this module only turns HTTP into calls
and answers into JSON. Errors are ``{"error": "one sentence"}`` with a 4xx status; an
unexpected failure is logged with a request id and answered 500 with that id only.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..catalog import Catalog, category_matches
from ..errors import FashionrecError
from .batcher import MicroBatcher
from .state import RunWatcher

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
        max_upload_bytes: largest request body (413 above).
        max_batch, max_wait_ms: photo queries answered together (see
            :class:`~fashionrec.serve.batcher.MicroBatcher`).
        max_k: largest ``k`` a query may ask for.
        check_interval: seconds between looks for changes to the run on disk.
    """

    run_dir: str
    api_key: str | None = None
    cors_origins: tuple = field(default_factory=tuple)
    max_upload_bytes: int = 10 * 2**20
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_k: int = 100
    check_interval: float = 0.5


class ApiError(Exception):
    """A 4xx answer with one sentence."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("fashionrec_requests", "HTTP requests",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("fashionrec_request_seconds", "HTTP request latency",
                                 ["route", "method"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5, 10))
        self.items = Gauge("fashionrec_items", "Items in the served index",
                           registry=self.registry)
        self.batch = Histogram("fashionrec_photo_batch_size", "Photo queries per backbone call",
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))


class BodyLimit:
    """ASGI middleware: a request whose body exceeds ``limit`` bytes gets 413, told by
    its Content-Length or counted while the body streams in."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the upload is larger than the limit of {self.limit:,} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await _json(413, message)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, message)
            return event
        return await self.app(scope, counted, send)


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
            if isinstance(exc, ApiError):  # raised while the body streamed in (413)
                response = _json(exc.status, exc.message)
            else:
                logger.error("request %s %s %s failed", rid, scope.get("method"),
                             scope.get("path"), exc_info=exc)
                response = _json(500, f"internal error (request id {rid})", request_id=rid)
            if started:
                raise
            await response(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "-")
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - t)
            self.metrics.requests.labels(route, method, str(status)).inc()


def _json(status, message, **extra):
    return JSONResponse({"error": message, **extra}, status_code=status)


def _jsonable_id(item_id):
    return item_id.item() if isinstance(item_id, np.generic) else item_id


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
    watcher = watcher or RunWatcher(settings.run_dir, settings.check_interval, log=say)
    metrics = _Metrics()

    def run_batch(requests):
        return watcher.current().recommend_batch(requests)

    batcher = MicroBatcher(run_batch, settings.max_batch, settings.max_wait_ms / 1e3,
                           on_batch=metrics.batch.observe)

    async def lifespan(app):
        threading.Thread(target=_warm, name="fashionrec-warm", daemon=True).start()
        yield
        batcher.close()

    def _warm():
        try:
            watcher.warm()
            say(f"serve: ready ({len(watcher.rec.index_)} items)")
        except Exception:  # noqa: BLE001 - reported; /api/ready stays no
            logger.exception("warming the model failed")

    app = FastAPI(title="fashionrec", version=__version__, lifespan=lifespan,
                  description="Visually similar products: recommend by item id or by photo, "
                              "browse the catalog, add and remove products.")
    app.state.watcher, app.state.batcher, app.state.settings = watcher, batcher, settings

    # ------------------------------------------------------------ plumbing
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return _json(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        message = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404 and message == "Not Found":
            message = f"there is no {request.url.path} here"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _json(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _json(422, f"{where}: {first.get('msg', 'invalid value')}")

    def rec():
        if not watcher.ready:
            raise ApiError(503, "the service is starting: the model is loading")
        current = watcher.current()
        metrics.items.set(len(current.index_))
        return current

    def check_write(request):
        if not settings.api_key:
            raise ApiError(403, "writes are off: start the service with an API key "
                                "(FASHIONREC_API_KEY or --api-key-file) to add or remove items")
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise ApiError(401, "this route needs an 'Authorization: Bearer <key>' header")
        if not hmac.compare_digest(auth[7:].strip().encode(), settings.api_key.encode()):
            raise ApiError(403, "the API key is not valid")

    def item_json(r, index, row):
        item_id = _jsonable_id(index.ids[row])
        out = {"id": item_id, "label": int(index.labels[row]),
               "class_name": r.class_names[int(index.labels[row])]}
        if index.categories is not None and index.categories[row]:
            out["category"] = index.category_of(row)
        out["image_url"] = image_url(item_id)
        return out

    def image_url(item_id):
        from urllib.parse import quote

        return f"/api/items/{quote(str(item_id), safe='')}/image"

    def result_json(result):
        """The answer as ``recommend --json`` gives it, plus each item's picture URL
        (a JSONResponse straight away: no second walk through FastAPI's encoder)."""
        out = result.to_dict()
        for item in out["items"]:
            item["image_url"] = image_url(item["id"])
        return JSONResponse(out)

    def find_row(r, index, item_id):
        row = index.row_of(item_id)
        if row is None:
            raise ApiError(404, f"item {item_id!r} is not in the catalog")
        return row

    def filters(k, category):
        if k > settings.max_k:
            raise ApiError(422, f"k must be at most {settings.max_k}, got {k}")
        category = None if category is None or not category.strip() else category.strip()
        return category

    # ------------------------------------------------------------ probes, stats
    @app.get("/api/health", summary="The process is alive")
    def health():
        return {"status": "ok"}

    @app.get("/api/ready", summary="The model is loaded and warmed")
    def ready():
        if not watcher.ready:
            return _json(503, "the service is starting: the model is loading", ready=False)
        return {"ready": True}

    @app.get("/api/stats", summary="Items, classes, the run and its index")
    def stats():
        r = rec()
        index, meta = r.index_, r.metadata_
        return {"items": len(index), "classes": list(r.class_names),
                "run": {"run_id": r.run_id_, "dataset": meta["dataset"].get("name"),
                        "kind": meta["dataset"].get("kind"),
                        "backbone": meta.get("backbone_description"),
                        "image_size": r.config.image_size, "created": meta.get("created"),
                        "fashionrec_version": meta.get("fashionrec_version")},
                "index": {"generation": index.metadata.get("generation", 0),
                          "updates": index.metadata.get("n_updates", 0),
                          "search": r.search_spec["backend"], "search_params": r.search_spec}}

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def prometheus():
        if watcher.ready:
            metrics.items.set(len(watcher.rec.index_))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ items
    @app.get("/api/items", summary="Browse the catalog")
    def items(offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=500),
              class_name: str | None = Query(None, alias="class"),
              category: str | None = None):
        r = rec()
        index = r.index_
        mask = np.ones(len(index), dtype=bool)
        if class_name:
            if class_name not in r.class_names:
                raise ApiError(422, f"class {class_name!r} is not one of this run's classes")
            mask &= index.labels == r.class_names.index(class_name)
        if category and category.strip():
            mask &= category_matches(index.all_categories(), category.strip())
        rows = np.flatnonzero(mask)
        return {"total": int(len(rows)), "offset": offset, "limit": limit,
                "items": [item_json(r, index, row) for row in rows[offset:offset + limit]]}

    @app.get("/api/items/{item_id:path}/similar", summary="Items similar to a catalog item")
    def similar_to_item(item_id: str, k: int = Query(6, ge=1), same_class: bool = False,
                        category: str | None = None):
        r = rec()
        category = filters(k, category)
        index = r.index_
        find_row(r, index, item_id)
        try:
            result = r.recommend(item=item_id, k=k, same_class=same_class, category=category,
                                 with_image=False)
        except FashionrecError as exc:
            raise ApiError(422, str(exc)) from None
        return result_json(result)

    @app.get("/api/items/{item_id:path}/image", summary="An item's picture (PNG)",
             response_class=Response)
    def item_image(item_id: str):
        r = rec()
        index = r.index_
        find_row(r, index, item_id)
        image = r.item_image(item_id, index)
        if image is None:
            raise ApiError(404, f"the picture of item {item_id!r} is missing")
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png",
                        headers={"Cache-Control": "max-age=300"})

    @app.get("/api/items/{item_id:path}", summary="An item's metadata")
    def item(item_id: str):
        r = rec()
        index = r.index_
        return item_json(r, index, find_row(r, index, item_id))

    @app.delete("/api/items/{item_id:path}", summary="Remove an item (needs the API key)")
    def delete_item(item_id: str, request: Request):
        check_write(request)
        r = rec()
        index = r.index_
        row = find_row(r, index, item_id)
        with watcher.write_lock:
            try:
                r.remove([item_id], log=None)
            except FashionrecError as exc:
                raise ApiError(409 if "being updated" in str(exc) else 404, str(exc)) from None
            watcher.after_write()
        uploads = (Path(watcher.run_dir) / "uploads").resolve()
        picture = Path(index.paths[row]) if index.paths is not None and index.paths[row] else None
        if picture is not None and picture.resolve().parent == uploads:
            picture.unlink(missing_ok=True)  # a picture this service stored for the product
        return {"removed": _jsonable_id(r.index_.parse_id(item_id)), "items": len(r.index_)}

    @app.post("/api/items", summary="Add products: photos, ids, optional labels "
                                     "(needs the API key)")
    async def add_items(request: Request, images: Annotated[list[UploadFile], File()],
                        ids: Annotated[list[str] | None, Form()] = None,
                        labels: Annotated[list[str] | None, Form()] = None):
        check_write(request)
        r = rec()
        if ids is not None and len(ids) != len(images):
            raise ApiError(422, f"give one id per image ({len(images)} images, {len(ids)} ids)")
        if labels is not None and len(labels) not in (1, len(images)):
            raise ApiError(422, "give one label per image, or one for all")
        folder = Path(watcher.run_dir) / "uploads"
        folder.mkdir(exist_ok=True)
        paths = []
        for upload in images:
            data = await upload.read()
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(upload.filename or "image").stem)[:40]
            suffix = Path(upload.filename or "").suffix.lower()
            suffix = suffix if suffix in (".jpg", ".jpeg", ".png", ".webp") else ".png"
            path = folder / f"{uuid.uuid4().hex[:12]}-{stem or 'image'}{suffix}"
            path.write_bytes(data)
            paths.append(path)
        catalog = Catalog.from_files(
            paths, ids=ids if ids is not None else [Path(u.filename or p.name).stem
                                                    for u, p in zip(images, paths, strict=True)],
            labels=None if labels is None else (labels * len(images) if len(labels) == 1
                                                else labels))

        def add():
            with watcher.write_lock:
                report = r.add(catalog, progress=False, log=None)
                watcher.after_write()
                return report
        try:
            report = await asyncio.get_running_loop().run_in_executor(None, add)
        except FashionrecError as exc:
            for p in paths:
                p.unlink(missing_ok=True)  # nothing was added: keep no upload
            raise ApiError(409 if "being updated" in str(exc) else 422, str(exc)) from None
        added = {str(a["id"]) for a in report["added"]}
        for p, item_id in zip(paths, catalog.ids, strict=True):
            if str(item_id) not in added:
                p.unlink(missing_ok=True)  # skipped: keep no orphan upload
        if not report["n_added"] and report["skipped"]:
            first = report["skipped"][0]
            raise ApiError(422, f"nothing was added: {first['id'] or 'an image'} was skipped "
                                f"({first['kind']}: {first['reason']})")
        return {**report, "items": len(r.index_)}

    # ------------------------------------------------------------ photo queries
    @app.post("/api/similar", summary="Items similar to an uploaded photo")
    async def similar_to_photo(image: Annotated[UploadFile, File()],
                               k: Annotated[int, Form(ge=1)] = 6,
                               same_class: Annotated[bool, Form()] = False,
                               category: Annotated[str | None, Form()] = None):
        rec()
        if watcher.photo_error:
            raise ApiError(503, f"photo queries are unavailable here: {watcher.photo_error}")
        category = filters(k, category)
        data = await image.read()
        if not data:
            raise ApiError(400, "the uploaded image is empty")
        future = batcher.submit({"query": data, "k": k, "same_class": same_class,
                                 "category": category})
        try:
            result = await asyncio.wrap_future(future)
        except FashionrecError as exc:
            status = 400 if str(exc).startswith("cannot read image") else 422
            raise ApiError(status, str(exc).replace("image upload", "the uploaded image"))\
                from None
        return result_json(result)

    # ------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(RequestContext, metrics=metrics)  # outermost: sees every answer
    return app
