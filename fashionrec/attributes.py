"""Product attributes: typed columns beside the catalog's vectors.

A catalog's attributes (a CSV's columns, a folder's sidecar file, values given with a
new product) arrive as text or JSON values. :func:`infer_schema` gives each a type
(``string``, ``integer``, ``float`` or ``boolean``, as :mod:`fashionrec.filters`
knows them); :func:`columns` turns the values into typed arrays, the form the index
stores and the filters read: strings as objects (``""``: missing), every other type
as float64 (``NaN``: missing; booleans 1.0 / 0.0). A value that does not fit its
attribute's type is a one-line :class:`~fashionrec.errors.FashionrecError`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from .errors import FashionrecError
from .filters import KEYWORDS, TYPES

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # what the filter language can address
BOOLEANS = {"true": True, "false": False}
# attribute names an item already answers under (results.Item) or filters own
RESERVED = frozenset({"id", "rank", "label", "class_name", "distance", "category", "path",
                      "attributes", *KEYWORDS})
NAME_ATTRIBUTES = ("name", "title", "productDisplayName", "display_name", "product_name")


def name_problem(name):
    """Why ``name`` cannot be an attribute, or ``None``."""
    if not isinstance(name, str) or not NAME.match(name):
        return (f"attribute {name!r} is not a name the filter language can address "
                f"(letters, digits and _, not starting with a digit)")
    if name in RESERVED:
        return f"attribute {name!r} is a reserved word; rename the column"
    return None


def _text(value):
    """A value as the text it was written as (``None`` and NaN: ``""``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _fits(kind, text):
    if kind == "boolean":
        return text.lower() in BOOLEANS
    if kind == "integer":
        return re.fullmatch(r"[-+]?\d+", text) is not None
    if kind == "float":
        try:
            return math.isfinite(float(text))
        except ValueError:
            return False
    return True


def infer_type(values):
    """The narrowest type every non-empty value fits: boolean, integer, float or string."""
    texts = [t for t in map(_text, values) if t]
    for kind in ("boolean", "integer", "float"):
        if texts and all(_fits(kind, t) for t in texts):
            return kind
    return "string"


def infer_schema(raw):
    """``{name: type}`` of ``raw`` (``{name: values}``), in its order."""
    return {name: infer_type(values) for name, values in raw.items()}


def check_schema(schema):
    """``schema`` if it is ``{name: type}`` with addressable names and known types."""
    if not isinstance(schema, dict):
        raise FashionrecError("an attribute schema is a {name: type} mapping")
    for name, kind in schema.items():
        if name_problem(name):
            raise FashionrecError(name_problem(name))
        if kind not in TYPES:
            raise FashionrecError(f"attribute {name}: type {kind!r} is not one of "
                                  f"{', '.join(TYPES)}")
    return schema


def convert(name, kind, value):
    """One value as stored: ``str`` for strings (``""`` missing), else a float (NaN
    missing); a value that does not fit ``kind`` raises, naming the attribute."""
    text = _text(value)
    if kind == "string":
        return text
    if not text:
        return math.nan
    if isinstance(value, bool) != (kind == "boolean") and not isinstance(value, str):
        raise FashionrecError(f"attribute {name} is {_a(kind)}; {json.dumps(value)} is not")
    if not _fits(kind, text) or (kind == "integer" and isinstance(value, float)):
        given = repr(text) if isinstance(value, str) else json.dumps(value)
        raise FashionrecError(f"attribute {name} is {_a(kind)}; {given} is not")
    if kind == "boolean":
        return 1.0 if BOOLEANS[text.lower()] else 0.0
    return float(text)


def _a(kind):
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def empty(kind, n):
    """A column of ``n`` missing values."""
    return np.full(n, "", dtype=object) if kind == "string" else np.full(n, np.nan)


def columns(schema, raw, n, ids=None):
    """``{name: typed (n,) array}`` of the values in ``raw`` (``{name: values}``; an
    attribute of ``schema`` not in ``raw`` is missing everywhere); a value that does
    not fit raises, naming its product when ``ids`` are given."""
    out = {}
    for name, kind in schema.items():
        values = (raw or {}).get(name)
        if values is None:
            out[name] = empty(kind, n)
            continue
        if len(values) != n:
            raise FashionrecError(f"attribute {name} has {len(values)} values for {n} items")
        column = np.empty(n, dtype=object if kind == "string" else np.float64)
        for r, value in enumerate(values):
            try:
                column[r] = convert(name, kind, value)
            except FashionrecError as exc:
                raise FashionrecError(exc.args[0] if ids is None else
                                      f"product {ids[r]}: {exc.args[0]}") from None
        out[name] = column
    return out


def given(schema, values):
    """Attribute values given with one product (``{name: text or JSON value}``) checked
    against ``schema``: an unknown name or a value of the wrong type raises."""
    for name in values:
        if name not in schema:
            known = ", ".join(schema) or "none"
            raise FashionrecError(f"unknown attribute {name!r} (this catalog has: {known})")
        convert(name, schema[name], values[name])
    return values


def parse_assignments(pairs):
    """``{key: value}`` from ``key=value`` strings (the CLI's ``--attr``)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FashionrecError(f"--attr takes key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def shown(kind, value):
    """A stored value as JSON shows it (missing: ``None``)."""
    if kind == "string":
        return value or None
    if value is None or math.isnan(value):
        return None
    if kind == "boolean":
        return bool(value)
    return int(value) if kind == "integer" else float(value)


def row(schema, cols, r):
    """``{name: value}`` of item ``r``, missing values left out."""
    out = {}
    for name, kind in schema.items():
        value = shown(kind, cols[name][r])
        if value is not None:
            out[name] = value
    return out


def gather(parts, schema, rows, total):
    """The columns of ``schema`` gathered from ``parts`` (``(schema, cols)`` of each
    part) at ``rows`` of each, in order; a part without an attribute, or with it stored
    as another kind of column, gives missing values."""
    out = {name: empty(kind, total) for name, kind in schema.items()}
    start = 0
    for (part_schema, cols), r in zip(parts, rows, strict=True):
        for name, kind in schema.items():
            theirs = part_schema.get(name)
            if theirs is not None and (theirs == "string") == (kind == "string"):
                out[name][start:start + len(r)] = np.asarray(cols[name])[r]
        start += len(r)
    return out


# ------------------------------------------------------------------ HDF5
def save(f, schema, cols):
    """Write the columns into group ``attributes`` of an open HDF5 file."""
    if not schema:
        return
    import h5py

    group = f.create_group("attributes")
    group.attrs["schema"] = json.dumps(schema)
    for name, kind in schema.items():
        if kind == "string":
            group.create_dataset(name, data=np.asarray(cols[name], dtype=object),
                                 dtype=h5py.string_dtype())
        else:
            group.create_dataset(name, data=np.asarray(cols[name], dtype=np.float64))


def load(f):
    """``(schema, columns)`` of an open HDF5 file (``({}, {})`` when it has none)."""
    if "attributes" not in f:
        return {}, {}
    group = f["attributes"]
    schema = check_schema(json.loads(group.attrs["schema"]))
    cols = {}
    for name, kind in schema.items():
        data = group[name]
        cols[name] = (np.array(data.asstr()[:], dtype=object) if kind == "string"
                      else data[:].astype(np.float64))
    return schema, cols


# ------------------------------------------------------------------ sidecar files
def read_sidecar(path, ids):
    """``{name: values}`` aligned with ``ids`` from a CSV (an ``id`` column) or
    JSON-lines file (an ``"id"`` key per line) of attributes by product id; products
    it does not list get missing values."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FashionrecError(f"attributes file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FashionrecError(f"cannot read attributes file {path} ({exc})") from None
    records = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FashionrecError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise FashionrecError(f"{path}:{line_no}: each line is an object with an "
                                      f"\"id\"")
            records.append(record)
    else:
        reader = csv.DictReader(text.splitlines())
        if "id" not in (reader.fieldnames or []):
            raise FashionrecError(f"attributes file {path} has no id column")
        records = list(reader)
    by_id = {}
    for record in records:
        by_id[_text(record["id"])] = record
    names = list(dict.fromkeys(k for r in records for k in r if k != "id"))
    for name in names:
        if name_problem(name):
            raise FashionrecError(f"{path}: {name_problem(name)}")
    return {name: [_text(by_id.get(str(i), {}).get(name)) for i in ids] for name in names}
