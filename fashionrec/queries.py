"""Queries: what a query stands for, prepared for the model, and its nearest items.

A query is a test-split index (Fashion-MNIST runs), an image file, image bytes (an
upload), an image array, or a catalog item's id. :func:`prepare` turns an image query
into the views the model sees (:mod:`fashionrec.images` does the pixels);
:func:`nearest` searches one catalog snapshot with the filters and makes the
:class:`~fashionrec.results.Recommendation`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import attributes as attrs
from . import filters, images
from .catalog import category_matches
from .errors import FashionrecError
from .results import Item, Recommendation


def check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise FashionrecError(f"k must be a positive integer, got {k!r}")


def prepare(query, embedder, image_shape, test_images):
    """``(views, info)``: the query as the model takes it (``(V, S, S, 3)`` photos in
    every view of a catalog run, ``(1, H, W)`` gray for Fashion-MNIST) and a dict
    describing it. ``test_images()`` gives ``(x_test, y_test)`` for an index query."""
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        x_test, y_test = test_images()
        if not 0 <= int(query) < len(x_test):
            raise FashionrecError(f"test index {int(query)} is out of range 0..{len(x_test) - 1}")
        return x_test[int(query)][None], {"kind": "test_index", "test_index": int(query),
                                          "true_label": int(y_test[query])}
    # a catalog run's photo is decoded as its catalog's files are (JPEG draft scale)
    size = embedder.image_size if embedder.is_catalog else None
    if isinstance(query, (str, Path)):
        img = images.open_image(query, min_size=size)
        info = {"kind": "file", "source": str(query)}
    elif isinstance(query, (bytes, bytearray)):  # an uploaded file, read like a file
        img = images.decode_image(bytes(query), "upload", min_size=size)
        info = {"kind": "upload", "source": "upload"}
    elif isinstance(query, np.ndarray):
        info = {"kind": "array", "source": "array"}
        if not embedder.is_catalog:
            return images.to_gray(query, image_shape)[None], info
        img = images.pil_from_array(query)
    else:
        raise FashionrecError(f"a query is a test index, an image path, image bytes or "
                              f"an image array, not {type(query).__name__}")
    if embedder.is_catalog:
        return images.image_views(img, embedder.image_size, embedder.views), info
    return images.gray_from_pil(img, image_shape)[None], info


def answer(embedder, index, requests, image_shape, test_images):
    """Recommendations for image queries (dicts with ``query`` and optionally ``k``,
    ``same_class``, ``category``, ``where``) with one backbone call; a bad request gets its
    :class:`FashionrecError` in its place."""
    names = index.class_names
    results, prepared = [None] * len(requests), []
    for i, req in enumerate(requests):
        try:
            check_k(req.get("k", 6))
            prepared.append((i, *prepare(req["query"], embedder, image_shape, test_images)))
        except FashionrecError as exc:
            results[i] = exc
    if not prepared:
        return results
    batch = [v if embedder.is_catalog else v[0] for _, v, _ in prepared]
    probs, vectors = embedder.encode_images(np.stack(batch))
    for (i, views, info), p, vector in zip(prepared, probs, vectors, strict=True):
        req, pred = requests[i], int(p.argmax())
        info.update(predicted_label=pred, predicted_class=names[pred],
                    probability=float(p[pred]))
        if "true_label" in info:
            info["true_class"] = names[info["true_label"]]
        own = index.row_of(info["test_index"]) if info["kind"] == "test_index" else None
        try:
            results[i] = nearest(index, names, info, vector[None], pred, own, views[0],
                                 req.get("k", 6), req.get("same_class", False),
                                 req.get("category"), req.get("where"))
        except FashionrecError as exc:
            results[i] = exc
    return results


def item_query(index, class_names, item):
    """``(info, row)`` of a query by catalog item id (its stored vector is the query;
    :func:`item_vector`); a remote catalog's row is the product's record."""
    row = index.record(item, vector=True) if getattr(index, "remote", False) else \
        index.row_of(item)
    if row is None:
        raise FashionrecError(f"item {item!r} is not in the catalog")
    if isinstance(row, dict):
        info = {"kind": "item", "id": row["id"], "true_label": row["label"],
                "true_class": class_names[row["label"]],
                "category": row["category"] or class_names[row["label"]],
                "attributes": row["attributes"]}
        return ({**info, "path": row["path"]} if row["path"] else info), row
    label = int(index.labels[row])
    info = {"kind": "item", "id": _plain(index, row), "true_label": label,
            "true_class": class_names[label], "category": index.category_of(row)}
    if index.paths is not None and index.paths[row]:
        info["path"] = index.paths[row]
    if index.schema:
        info["attributes"] = attrs.row(index.schema, index.attributes, row)
    return info, row


def item_vector(index, row):
    """The stored vector of the product at ``row`` (from :func:`item_query`), ``(1, D)``."""
    return row["vector"][None] if isinstance(row, dict) else index.vectors[row:row + 1]


def nearest(index, class_names, info, vector, query_class, own_row, image, k,
            same_class=False, category=None, where=None):
    """The ``k`` items of ``index`` nearest to ``vector`` (the query's own row
    ``own_row`` never), filtered by class, category and ``where`` (a
    :mod:`fashionrec.filters` condition on the products' attributes): a
    Recommendation of exactly ``k`` items whenever ``k`` items match."""
    allowed = None
    tree = None if where is None else filters.compile_filter(where, index.schema)
    if getattr(index, "remote", False):
        return _remote_nearest(index, class_names, info, vector, query_class, own_row,
                               image, k, same_class, category, tree, where)
    if same_class or category is not None or tree is not None:
        mask = np.ones(len(index), dtype=bool)
        wanted = []
        if same_class:
            mask &= index.labels == query_class
            wanted.append(f"class {class_names[query_class]}")
        if category is not None:
            mask &= category_mask(index, category)
            wanted.append(f"category {category}")
        if tree is not None:
            mask &= filters.mask(tree, index.attributes, len(index))
            wanted.append(where.strip())
            info["where"] = where.strip()
        if own_row is not None:
            mask[own_row] = False
        allowed = np.flatnonzero(mask)
        info.update(filter=" and ".join(wanted), n_candidates=int(len(allowed)))
        if not len(allowed):
            raise FashionrecError(f"no other catalog item is in {info['filter']}")
        k = min(k, len(allowed))
    elif k > len(index) - (own_row is not None):
        n = len(index) - (own_row is not None)
        raise FashionrecError(f"k={k} is more than the catalog's {n} "
                              f"{'other ' if own_row is not None else ''}items")
    exclude = None if own_row is None or allowed is not None else [own_row]
    rows, dists = index.search_rows(vector, k, exclude, allowed)
    items = [item_at(index, class_names, r + 1, row, d)
             for r, (row, d) in enumerate(zip(rows[0], dists[0], strict=True))]
    return Recommendation(query=info, items=items, image=image)


def _remote_nearest(index, class_names, info, vector, query_class, own_row, image, k,
                    same_class, category, tree, where):
    """:func:`nearest` on a remote catalog (:class:`fashionrec.milvus.MilvusCatalog`):
    the filters become one expression, the search and the count are its requests."""
    wanted = ([f"class {class_names[query_class]}"] * bool(same_class) +
              [f"category {category}"] * (category is not None) +
              ([where.strip()] if tree is not None else []))
    own = None if own_row is None else own_row["id"]
    expression = index.expression(query_class if same_class else None, category, tree, own)
    n = index.count(expression)
    if wanted:
        info.update(filter=" and ".join(wanted), n_candidates=n)
        if tree is not None:
            info["where"] = where.strip()
        if not n:
            raise FashionrecError(f"no other catalog item is in {info['filter']}")
        k = min(k, n)
    elif k > n:
        raise FashionrecError(f"k={k} is more than the catalog's {n} "
                              f"{'other ' if own is not None else ''}items")
    items = [item_at(index, class_names, r + 1, record, d)
             for r, (record, d) in enumerate(index.nearest(
                 vector, k, expression, n, None if wanted else n + (own is not None)))]
    return Recommendation(query=info, items=items, image=image)


def item_at(index, class_names, rank, row, distance):
    """The :class:`~fashionrec.results.Item` at ``row`` of ``index`` (or of a remote
    catalog's record)."""
    if isinstance(row, dict):
        label = row["label"]
        return Item(rank=rank, id=row["id"], label=label, class_name=class_names[label],
                    distance=float(distance), category=row["category"] or class_names[label],
                    path=row["path"], attributes=row["attributes"] if index.schema else None)
    label = int(index.labels[row])
    return Item(rank=rank, id=_plain(index, row), label=label, class_name=class_names[label],
                distance=float(distance),
                category=index.category_of(row) if index.categories is not None else None,
                path=str(index.paths[row]) if index.paths is not None and index.paths[row]
                else None, attributes=attrs.row(index.schema, index.attributes, row)
                if index.schema else None)


def _plain(index, row):
    item_id = index.ids[row]
    return int(item_id) if index.id_kind == "int" else str(item_id)


def item_picture(index, item_id, size):
    """A catalog item's picture for display (``size`` px), or ``None`` if its file is
    gone."""
    row = index.row_of(item_id)
    if row is None:
        raise FashionrecError(f"item {item_id!r} is not in the catalog")
    if isinstance(row, dict):  # a remote catalog's record
        return _read_or_none(row["path"], size) if row["path"] else None
    if index.images is not None:
        return index.images[row]
    if index.paths is not None and index.paths[row]:
        try:
            return images.read_image(index.paths[row], size)
        except FashionrecError:
            return None
    return None


def _read_or_none(path, size):
    try:
        return images.read_image(path, size)
    except FashionrecError:
        return None


def category_mask(index, wanted):
    """Boolean mask of the items of ``index`` in category ``wanted``
    (:func:`~fashionrec.catalog.category_matches`), matched once per distinct category
    path and spread to the items by their code (kept on the index, which never changes)."""
    codes = getattr(index, "_category_codes", None)
    if codes is None:
        codes = index._category_codes = np.unique(index.all_categories().astype(str),
                                                  return_inverse=True)
    distinct, inverse = codes
    return category_matches(distinct, wanted)[inverse.reshape(-1)]


def browse(index, offset=0, limit=24, class_name=None, category=None, where=None):
    """``(total, items)`` of the catalog's items of ``class_name`` in ``category``
    matching ``where`` (vectorised masks), ``limit`` of them from ``offset``."""
    if getattr(index, "remote", False):
        if class_name and class_name not in index.class_names:
            raise FashionrecError(f"class {class_name!r} is not one of this run's classes")
        tree = None if where is None else filters.compile_filter(where, index.schema)
        expression = index.expression(
            index.class_names.index(class_name) if class_name else None,
            category.strip() if category and category.strip() else None, tree)
        total, records = index.browse(expression, offset, limit)
        return total, [item_at(index, index.class_names, 0, r, 0.0) for r in records]
    mask = np.ones(len(index), dtype=bool)
    if class_name:
        if class_name not in index.class_names:
            raise FashionrecError(f"class {class_name!r} is not one of this run's classes")
        mask &= index.labels == index.class_names.index(class_name)
    if category and category.strip():
        mask &= category_mask(index, category.strip())
    if where is not None:
        mask &= filters.mask(filters.compile_filter(where, index.schema), index.attributes,
                             len(index))
    rows = np.flatnonzero(mask)
    return int(len(rows)), [item_at(index, index.class_names, 0, r, 0.0)
                            for r in rows[offset:offset + limit]]
