"""Item ids, checked in one place: every id a catalog, an added product or the API
takes must be one the service can show, store and route back.

An id may hold slashes inside (a folder catalog's ids are relative paths such as
``Footwear/Boots/acme/boots-0000.jpg``), but not at either end, and may not end in
``/image`` or ``/similar``: the API's routes ``/api/items/{id}/image`` and
``/api/items/{id}/similar`` could not tell such an id from the route.
"""

from __future__ import annotations

import unicodedata

from .errors import FashionrecError

MAX_ID_LENGTH = 256
ROUTE_SUFFIXES = ("/image", "/similar")


def _shown(item_id, limit=40):
    """The id as it goes into a one-line message (escaped, shortened)."""
    return repr(item_id if len(item_id) <= limit else item_id[:limit] + "...")


def id_problem(item_id):
    """What is wrong with ``item_id`` (one line), or ``None`` when it is a valid id.
    Integer ids (Fashion-MNIST runs) are checked as their ``str``."""
    item_id = str(item_id)
    if len(item_id) > MAX_ID_LENGTH:
        return (f"id {_shown(item_id)} is {len(item_id)} characters long; at most "
                f"{MAX_ID_LENGTH} are allowed")
    bad = next((c for c in item_id if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"id {_shown(item_id)} holds the control character U+{ord(bad):04X}"
    if not item_id.strip():
        return "an id may not be empty or only spaces"
    suffix = next((s for s in ROUTE_SUFFIXES if item_id.endswith(s)), None)
    if suffix:
        return (f"id {_shown(item_id)} ends in {suffix}, which the API's item routes "
                f"could not read back")
    if item_id.startswith("/") or item_id.endswith("/"):
        return f"id {_shown(item_id)} starts or ends with /"
    return None


def check_id(item_id):
    """``item_id`` as a ``str`` if it is a valid id, else a :class:`FashionrecError`
    naming the problem in one line."""
    problem = id_problem(item_id)
    if problem:
        raise FashionrecError(problem)
    return str(item_id)
