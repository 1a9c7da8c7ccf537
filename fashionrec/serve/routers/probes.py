"""Health, readiness, what is served (``/api/stats``) and Prometheus metrics."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ...errors import StoreUnavailable
from ..context import Ctx, json_error
from ..schemas import ERRORS, Health, Ready, Stats

router = APIRouter(responses=ERRORS)


@router.get("/api/health", summary="The process is alive", response_model=Health)
async def health():
    return {"status": "ok"}


@router.get("/api/ready", summary="The model is loaded and warmed", response_model=Ready)
async def ready(ctx: Ctx):
    if not ctx.watcher.ready:
        return json_error(503, "the service is starting: the model is loading", ready=False)
    if ctx.watcher.store_error:
        return json_error(503, f"{ctx.watcher.store_error}; the service retries every "
                               f"{ctx.watcher.probe_interval:g} s", ready=False)
    return {"ready": True}


@router.get("/api/stats", summary="Items, classes, the run and its index",
            response_model=Stats)
def stats(ctx: Ctx):
    return ctx.rec().stats()


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
def prometheus(ctx: Ctx):
    items = None  # metrics stay up while the catalog's store does not answer
    with contextlib.suppress(StoreUnavailable):
        items = len(ctx.watcher.rec.index_) if ctx.watcher.ready else 0
    return Response(ctx.metrics.exposition(items, ctx.batcher.pending()),
                    media_type=CONTENT_TYPE_LATEST)
