"""Items similar to an uploaded photo (queries that arrive together share one
backbone call through the app's :class:`~fashionrec.serve.batcher.MicroBatcher`).

Limits, each answered ``{"error": ...}``: an image whose header says it has more than
``settings.max_pixels`` pixels is 413 before it reaches the batcher; a full photo
queue is 503 with ``Retry-After``; a query not answered within
``settings.photo_timeout_s`` is 504 (its request is dropped from the queue, as is
one whose client left).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from ... import images
from ...errors import FashionrecError, StoreUnavailable
from ..batcher import QueueFull
from ..context import RETRY_AFTER_S, ApiError, Ctx, refusal, result_json
from ..schemas import ERRORS, Similar

router = APIRouter(responses=ERRORS)

UNAVAILABLE = ("photo queries are unavailable here: the run's backbone cannot be loaded "
               "on this server")  # the full reason (it names files) is in the log only
_TOO_LARGE = ("more pixels than the limit", "is more than the limit of")


@router.post("/api/similar", summary="Items similar to an uploaded photo",
             response_model=Similar)
async def similar_to_photo(ctx: Ctx, request: Request, image: Annotated[UploadFile, File()],
                           k: Annotated[int, Form(ge=1)] = 6,
                           same_class: Annotated[bool, Form()] = False,
                           category: Annotated[str | None, Form()] = None,
                           where: Annotated[str | None, Form()] = None):
    rec = ctx.rec(reload=False)
    if ctx.watcher.photo_error:
        raise ApiError(503, UNAVAILABLE)
    category = ctx.category_filter(k, category)
    where = ctx.where_filter(rec, where)
    data = await image.read()
    if not data:
        raise ApiError(400, "the uploaded image is empty")
    check_pixels(data, ctx.settings.max_pixels)
    try:
        future = ctx.batcher.submit({"query": data, "k": k, "same_class": same_class,
                                     "category": category, "where": where})
    except QueueFull as exc:
        raise ApiError(503, f"the service is busy: {exc}; try again in {RETRY_AFTER_S} s",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    try:
        result = await answer(request, future, ctx.settings.photo_timeout_s)
    except StoreUnavailable as exc:
        raise refusal(exc, 503) from None
    except FashionrecError as exc:
        message = str(exc)
        if any(text in message for text in _TOO_LARGE):
            status = 413
        else:
            status = 400 if message.startswith("cannot read image") else 422
        raise ApiError(status, message.replace("image upload", "the uploaded image")) \
            from None
    return result_json(result)


def check_pixels(data, max_pixels):
    """413 when the image's header says it has more than ``max_pixels`` pixels (read
    from the header only, no warning filters touched: other threads decode meanwhile);
    what is not an image we open is left to the library's 400."""
    try:
        images.check_header(data, "upload", max_pixels)
    except FashionrecError as exc:
        message = str(exc)
        if any(text in message for text in _TOO_LARGE):
            raise ApiError(413, message.replace("image upload", "the uploaded image")) \
                from None


async def answer(request, future, timeout_s, poll_s=0.25):
    """The batcher's result for ``future``; 504 after ``timeout_s``. When the client
    leaves or time runs out, ``future`` is cancelled (a queued request is skipped)."""
    waiting = asyncio.wrap_future(future)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise ApiError(504, f"the photo query was not answered within "
                                    f"{timeout_s:g} s; try again later")
            done, _ = await asyncio.wait({waiting}, timeout=min(poll_s, left))
            if done:
                return waiting.result()
            if await request.is_disconnected():
                raise ApiError(503, "the client left before the photo query was answered")
    finally:
        if not waiting.done():
            future.cancel()
            waiting.cancel()
