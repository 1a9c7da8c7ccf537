"""Items similar to an uploaded photo (queries that arrive together share one
backbone call through the app's :class:`~fashionrec.serve.batcher.MicroBatcher`)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from ...errors import FashionrecError
from ..context import ApiError, Ctx, result_json

router = APIRouter()


@router.post("/api/similar", summary="Items similar to an uploaded photo")
async def similar_to_photo(ctx: Ctx, image: Annotated[UploadFile, File()],
                           k: Annotated[int, Form(ge=1)] = 6,
                           same_class: Annotated[bool, Form()] = False,
                           category: Annotated[str | None, Form()] = None):
    ctx.rec()
    if ctx.watcher.photo_error:
        raise ApiError(503, f"photo queries are unavailable here: {ctx.watcher.photo_error}")
    category = ctx.category_filter(k, category)
    data = await image.read()
    if not data:
        raise ApiError(400, "the uploaded image is empty")
    future = ctx.batcher.submit({"query": data, "k": k, "same_class": same_class,
                                 "category": category})
    try:
        result = await asyncio.wrap_future(future)
    except FashionrecError as exc:
        status = 400 if str(exc).startswith("cannot read image") else 422
        raise ApiError(status, str(exc).replace("image upload", "the uploaded image")) \
            from None
    return result_json(result)
