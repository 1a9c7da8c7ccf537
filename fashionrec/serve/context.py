"""What every router shares: the served run, the settings, the metrics and the photo
batcher (one :class:`Context` per app, reached through :data:`Ctx`), the checks the
routes make, and how library answers become JSON.

Answers never hold a file path: an :class:`~fashionrec.results.Item`'s ``path`` and a
query's ``path`` are left out, and each item gets the URL of its picture instead.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from .. import filters
from ..errors import FashionrecError, StoreUnavailable
from ..rundir import StaleVersion
from .pictures import DisplayCache
from .uploads import Uploads


class ApiError(Exception):
    """A 4xx (or 503 / 504) answer with one sentence, and optional response headers."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


RETRY_AFTER_S = 1  # what a client told "busy" or "the store did not answer" waits


def refusal(exc, status):
    """The answer to a library error: 503 with ``Retry-After`` when the catalog's store
    did not answer (:class:`~fashionrec.errors.StoreUnavailable`), else ``status``."""
    if isinstance(exc, StoreUnavailable):
        return store_down(exc)
    return ApiError(status, str(exc))


def store_down(exc):
    """503 for a :class:`~fashionrec.errors.StoreUnavailable` (the store's address and
    the failure are for the log: ``/api/ready`` and the service's log say more)."""
    return ApiError(503, f"{exc.public}; try again in {RETRY_AFTER_S} s",
                    {"Retry-After": str(RETRY_AFTER_S)})


def json_error(status, message, headers=None, **extra):
    """``{"error": message, **extra}`` with ``status`` (and ``headers``)."""
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


@dataclass
class Context:
    """The app's dependencies, handed to every route (see :data:`Ctx`).

    Args:
        settings: the :class:`~fashionrec.serve.app.ServeSettings`.
        watcher: the served run (:class:`~fashionrec.serve.state.RunWatcher`).
        metrics: the app's Prometheus metrics.
        batcher: photo queries (:class:`~fashionrec.serve.batcher.MicroBatcher`).
    """

    settings: object
    watcher: object
    metrics: object
    batcher: object

    def __post_init__(self):
        self.uploads = Uploads(self.watcher.run_dir)
        self.pictures = DisplayCache(getattr(self.settings, "display_cache_bytes", 0))

    def rec(self, reload=True):
        """The recommender to answer with; 503 while the model is loading. Async routes
        pass ``reload=False`` (no model is ever loaded on the event loop)."""
        if not self.watcher.ready:
            raise ApiError(503, "the service is starting: the model is loading")
        return self.watcher.current(reload)

    def check_write(self, request):
        """401 / 403 unless the request carries the API key (writes need it)."""
        key = self.settings.api_key
        if not key:
            raise ApiError(403, "writes are off: start the service with an API key "
                                "(FASHIONREC_API_KEY or --api-key-file) to add or remove items")
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise ApiError(401, "this route needs an 'Authorization: Bearer <key>' header")
        if not hmac.compare_digest(auth[7:].strip().encode(), key.encode()):
            raise ApiError(403, "the API key is not valid")

    def category_filter(self, k, category):
        """422 when ``k`` is above the limit; the category to filter by, or ``None``."""
        if k > self.settings.max_k:
            raise ApiError(422, f"k must be at most {self.settings.max_k}, got {k}")
        return None if category is None or not category.strip() else category.strip()

    @staticmethod
    def where_filter(rec, where):
        """The attribute filter to apply (``None``: none), checked against the served
        catalog's schema: 422 naming the problem (before any photo is read)."""
        if where is None or not where.strip():
            return None
        try:
            filters.compile_filter(where, rec.index_.schema)
        except FashionrecError as exc:
            raise ApiError(422, f"where: {exc}") from None
        return where.strip()

    def write(self, write, status):
        """``write(rec)`` with the served recommender, under the service's write lock
        (taken first: the recommender is the one served when the write runs), then the
        files noted as ours; returns ``(its answer, rec)``. A
        :class:`~fashionrec.errors.FashionrecError` is answered 409 when the catalog is
        being updated or the model version changed meanwhile, else ``status``."""
        with self.watcher.write_lock:
            rec = self.watcher.rec
            run_id = rec.run_id_
            try:
                out = write(rec)
            except FashionrecError as exc:
                conflict = isinstance(exc, StaleVersion) or "being updated" in str(exc)
                raise refusal(exc, 409 if conflict else status) from None
            self.watcher.after_write(rec, run_id)
        return out, rec


async def _context(request: Request):
    return request.app.state.context


Ctx = Annotated[Context, Depends(_context)]  # a route's parameter: the app's Context


def n_items(rec):
    """How many items ``rec`` serves."""
    return rec.stats()["items"]


def image_url(item_id):
    return f"/api/items/{quote(str(item_id), safe='')}/image"


def item_json(item):
    """An :class:`~fashionrec.results.Item` as the API shows it (no file path)."""
    out = {"id": item.id, "label": item.label, "class_name": item.class_name}
    if item.category:
        out["category"] = item.category
    if item.attributes:
        out["attributes"] = item.attributes
    out["image_url"] = image_url(item.id)
    return out


def result_json(result):
    """A :class:`~fashionrec.results.Recommendation` as ``recommend --json`` gives it,
    without file paths, plus each item's picture URL (a JSONResponse straight away: no
    second walk through FastAPI's encoder)."""
    out = result.to_dict()
    out["query"] = {k: v for k, v in out["query"].items() if k != "path"}
    for item in out["items"]:
        item.pop("path", None)
        item["image_url"] = image_url(item["id"])
    return JSONResponse(out)
