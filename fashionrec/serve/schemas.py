"""The shapes of the API's answers, as the OpenAPI spec (``/openapi.json``) states them
and the fuzz test (schemathesis) holds the service to. Every error, whatever its
status, is :class:`Error`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # an answer may say more than the spec lists


class Error(_Open):
    error: str  # one sentence
    request_id: str | None = None  # on a 500, the key to the operator's log


class Health(_Open):
    status: str


class Ready(_Open):
    ready: bool


class Stats(_Open):
    items: int
    classes: list[str]
    attributes: dict[str, str] = {}  # the products' attributes: {name: type}
    run: dict[str, Any]
    index: dict[str, Any]


class Item(_Open):
    id: int | str
    label: int
    class_name: str
    category: str | None = None
    attributes: dict[str, Any] | None = None  # the product's (fashionrec.attributes)
    image_url: str


class Neighbour(Item):
    rank: int
    distance: float


class Similar(_Open):
    query: dict[str, Any]  # what the query was (kind, class, probability, filter)
    items: list[Neighbour]


class Page(_Open):
    total: int
    offset: int
    limit: int
    items: list[Item]


class Added(_Open):
    n_added: int
    added: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    items: int


class Removed(_Open):
    removed: int | str
    items: int


_WHEN = {400: "the request or its image cannot be read",
         401: "a write without an 'Authorization: Bearer' header",
         403: "writes are off, or the API key is not valid",
         404: "no such item (or its picture is gone)",
         409: "the catalog is being updated, or the model changed meanwhile: send it again",
         413: "the body is over the upload limit, or the image over the pixel budget",
         422: "a parameter or the uploaded data is not valid",
         503: "starting, the photo queue is full or the catalog's store (Milvus) does "
              "not answer (with Retry-After), or photo queries are off",
         504: "the photo query was not answered in time"}
ERRORS = {status: {"model": Error, "description": text} for status, text in _WHEN.items()}
