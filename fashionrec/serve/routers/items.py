"""The catalog: browse it, one item, the items similar to one, its picture; add and
remove products (writes: they need the API key)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from ...catalog import Catalog
from ...errors import FashionrecError
from ..context import ApiError, Ctx, item_json, n_items, refusal, result_json
from ..schemas import ERRORS, Added, Item, Page, Removed, Similar

router = APIRouter(responses=ERRORS)


def _item(rec, item_id):
    """The catalog item ``item_id``; 404 if there is none."""
    try:
        return rec.item(item_id)
    except FashionrecError as exc:
        raise refusal(exc, 404) from None


@router.get("/api/items", summary="Browse the catalog", response_model=Page)
def items(ctx: Ctx, offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=500),
          class_name: str | None = Query(None, alias="class"),
          category: str | None = None,
          where: str | None = Query(None, description="a filter on the products' "
                                    "attributes, e.g. price < 50 and gender == \"Women\"")):
    rec = ctx.rec()
    where = ctx.where_filter(rec, where)
    try:
        total, found = rec.browse(offset, limit, class_name, category, where)
    except FashionrecError as exc:
        raise refusal(exc, 422) from None
    return {"total": total, "offset": offset, "limit": limit,
            "items": [item_json(item) for item in found]}


@router.get("/api/items/{item_id:path}/similar", summary="Items similar to a catalog item",
            response_model=Similar)
def similar_to_item(ctx: Ctx, item_id: str, k: int = Query(6, ge=1), same_class: bool = False,
                    category: str | None = None, where: str | None = None):
    rec = ctx.rec()
    category = ctx.category_filter(k, category)
    where = ctx.where_filter(rec, where)
    _item(rec, item_id)
    try:
        result = rec.recommend(item=item_id, k=k, same_class=same_class, category=category,
                               where=where, with_image=False)
    except FashionrecError as exc:
        raise refusal(exc, 422) from None
    return result_json(result)


@router.get("/api/items/{item_id:path}/image", summary="An item's picture (PNG)",
            response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the picture"}})
def item_image(ctx: Ctx, item_id: str):
    try:
        data = ctx.pictures.picture(ctx.rec(), item_id)
    except FashionrecError as exc:
        raise refusal(exc, 404) from None
    if data is None:
        raise ApiError(404, f"the picture of item {item_id!r} is missing")
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=300"})


@router.get("/api/items/{item_id:path}", summary="An item's metadata", response_model=Item)
def item(ctx: Ctx, item_id: str):
    return item_json(_item(ctx.rec(), item_id))


@router.delete("/api/items/{item_id:path}", summary="Remove an item (needs the API key)",
               response_model=Removed)
def delete_item(ctx: Ctx, item_id: str, request: Request):
    ctx.check_write(request)
    gone = _item(ctx.rec(), item_id)
    _, rec = ctx.write(lambda rec: rec.remove([item_id], log=None), status=404)
    ctx.uploads.delete_picture(gone.path)  # a picture this service stored for the product
    return {"removed": gone.id, "items": n_items(rec)}


_LIST = {"type": "array", "items": {"type": "string"}}
_ADD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                   "ids": _LIST, "labels": _LIST,
                   "attributes": {"type": "string", "description": (
                       "JSON: one object of attributes for every image, or a list of one "
                       "object per image; or form fields attr.<name>")}}}}}}}


@router.post("/api/items", summary="Add products: photos, ids, optional labels "
                                   "(needs the API key)", openapi_extra=_ADD_BODY,
             response_model=Added)
async def add_items(ctx: Ctx, request: Request):
    ctx.check_write(request)  # before a byte of the body is read
    ctx.rec(reload=False)  # 503 while starting
    async with request.form() as form:
        images, ids, labels = _add_form(form)
        given = _attributes_form(form, len(images))
        batch = ctx.uploads.batch()
        try:
            for upload in images:
                await batch.save(upload)
            catalog = _catalog(batch, ids, labels, given)
            report, rec = await asyncio.get_running_loop().run_in_executor(
                None, ctx.write, lambda rec: rec.add(catalog, progress=False, log=None), 422)
            added = {str(a["id"]) for a in report["added"]}
            batch.keep(p for p, i in zip(batch.paths, catalog.ids, strict=True)
                       if str(i) in added)
        except ApiError as exc:
            exc.message = batch.public(exc.message)
            raise
        finally:
            batch.discard()  # whatever happened: no upload of a product not added
    skipped = [{**{k: v for k, v in s.items() if k != "path"},
                "reason": batch.public(s["reason"])} for s in report["skipped"]]
    if not report["n_added"] and skipped:
        first = skipped[0]
        raise ApiError(422, f"nothing was added: {first['id'] or 'an image'} was skipped "
                            f"({first['kind']}: {first['reason']})")
    return {**report, "skipped": skipped, "items": n_items(rec)}


def _catalog(batch, ids, labels, given=None):
    """The saved files as a :class:`~fashionrec.catalog.Catalog`; ids default to the
    client's file names (without extension); 422 when it cannot be one."""
    try:
        return Catalog.from_files(batch.paths, labels=labels,
                                  ids=ids or [Path(name).stem for name in batch.names],
                                  attributes=given)
    except FashionrecError as exc:
        raise refusal(exc, 422) from None


def _attributes_form(form, n):
    """``{name: one value per image}`` from an add request's ``attributes`` JSON part
    (an object for every image, or a list of one object per image) and its
    ``attr.<name>`` fields (one value for all, or one per image); ``None`` if none."""
    out = {}
    text = form.getlist("attributes")
    if len(text) > 1 or (text and not isinstance(text[0], str)):
        raise ApiError(422, "attributes: give one JSON text part")
    if text:
        try:
            value = json.loads(text[0])
        except ValueError as exc:
            raise ApiError(422, f"attributes: not JSON ({exc})") from None
        rows = [value] * n if isinstance(value, dict) else value
        if not isinstance(rows, list) or len(rows) != n or not all(
                isinstance(r, dict) for r in rows):
            raise ApiError(422, f"attributes: one JSON object for all images, or a list "
                                f"of {n} objects (one per image)")
        for name in dict.fromkeys(k for r in rows for k in r):
            out[name] = [r.get(name) for r in rows]
    for key in dict.fromkeys(k for k in form if k.startswith("attr.")):
        values = form.getlist(key)
        if not all(isinstance(v, str) for v in values) or len(values) not in (1, n):
            raise ApiError(422, f"{key}: give text, one value for all images or one per "
                                f"image")
        out[key[5:]] = values * n if len(values) == 1 else values
    for name, values in out.items():
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            raise ApiError(422, f"attributes: {name} takes a string, number or boolean")
    return out or None


def _add_form(form):
    """``(images, ids, labels)`` of an add request's form, checked: one id per image
    (or none), one label per image or one for all (or none)."""
    images = form.getlist("images")
    if not images:
        raise ApiError(422, "images: Field required")
    if not all(isinstance(f, UploadFile) for f in images):
        raise ApiError(422, "images: every 'images' part must be a file")
    ids, labels = form.getlist("ids") or None, form.getlist("labels") or None
    if not all(isinstance(v, str) for v in (ids or []) + (labels or [])):
        raise ApiError(422, "ids, labels: give text, not files")
    if ids is not None and len(ids) != len(images):
        raise ApiError(422, f"give one id per image ({len(images)} images, {len(ids)} ids)")
    if labels is not None and len(labels) not in (1, len(images)):
        raise ApiError(422, "give one label per image, or one for all")
    if labels is not None and len(labels) == 1:
        labels = labels * len(images)
    return images, ids, labels
