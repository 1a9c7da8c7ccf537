"""Milvus as the catalog store (``pip install 'fashionrec[milvus]'``).

A catalog lives in a Milvus collection: one row per product with its standardized
vector (metric L2, the design card's Euclidean ranking; an HNSW index), its id
(``pk``), class number, category path and attributes as scalar fields. Readers reach
it through a collection **alias**: :meth:`MilvusStore.publish` builds a new collection
and then switches the alias, so a reader sees the old catalog whole or the new one
whole. Every request uses the ``Strong`` consistency level: a product added and
answered is found by the very next query, from any process.

``uri`` is a local ``.db`` file (Milvus Lite, embedded) or ``http://host:19530``
(Milvus Lite's server, Milvus Standalone or Distributed); the code is the same.
Credentials come from ``FASHIONREC_MILVUS_TOKEN`` or the file named by
``FASHIONREC_MILVUS_TOKEN_FILE`` (``user:password`` or an API key), never from a
run's record or the logs (:func:`public_uri` is what they show).

:class:`MilvusCatalog` is a snapshot that holds nothing: every question (how many
products, one product, the nearest ones under a filter, a page of them) is a request
to Milvus, filters translated into Milvus' boolean expressions
(:func:`fashionrec.filters.to_milvus`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from . import attributes as attrs
from . import filters
from .errors import FashionrecError, StoreUnavailable
from .rundir import StaleVersion
from .store import CatalogStore

ENV_TOKEN = "FASHIONREC_MILVUS_TOKEN"
ENV_TOKEN_FILE = "FASHIONREC_MILVUS_TOKEN_FILE"
CONSISTENCY = "Strong"
HNSW = {"M": 16, "efConstruction": 200}
EF_SEARCH = 128
BATCH = 2000  # rows per insert request
# a filter that this many products or fewer match is ranked exactly, read in one query
# (Milvus answers a query with at most 16,384 rows: its default max result window)
EXACT_MAX = 16384
EF_MAX = 4096  # the widest HNSW search a broad filter gets before it is ranked exactly
PUBLISH_MAX_S = 600.0  # a publish's flag older than this is a publish that died
ID_MAX, PATH_MAX, CATEGORY_MAX, STRING_MAX = 512, 4096, 2048, 4096
FIELD_TYPES = {"string": "VARCHAR", "integer": "INT64", "float": "DOUBLE", "boolean": "BOOL"}
SCALARS = ("pk", "label", "category", "path")


def public_uri(uri):
    """``uri`` without credentials (what a record or a log may show)."""
    parts = urlsplit(str(uri))
    if parts.scheme in ("http", "https", "tcp", "grpc") and parts.netloc:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return str(uri)


def _token():
    if os.environ.get(ENV_TOKEN):
        return os.environ[ENV_TOKEN]
    path = os.environ.get(ENV_TOKEN_FILE)
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise FashionrecError(f"{ENV_TOKEN_FILE}: cannot read {path} ({exc.strerror})") \
                from None
    return ""


def _short(exc):
    text = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def connect(uri, timeout=10.0):
    """A client of the Milvus at ``uri``; a one-line error naming it (without
    credentials) when it cannot be reached."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise FashionrecError("the Milvus store needs pymilvus and milvus-lite: pip install "
                              "'fashionrec[milvus]'") from None
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # errors come back as ours
    try:
        client = MilvusClient(uri=str(uri), token=_token(), timeout=timeout)
        client.list_collections()
    except FashionrecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any client failure is "unreachable"
        raise FashionrecError(f"Milvus at {public_uri(uri)} is unreachable "
                              f"({_short(exc)})") from None
    return client


def _call(uri, what, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a Milvus failure as one line naming ``uri``."""
    try:
        return fn(*args, **kwargs)
    except FashionrecError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MilvusUnavailable(f"Milvus at {public_uri(uri)}: {what} failed "
                                f"({_short(exc)})") from None


def _on(client, uri, name, what, fn, *args, **kwargs):
    """``fn(name, *args, **kwargs)`` through :func:`_call`; a collection found released
    (a restarted Milvus Lite server does not load its collections again) is loaded and
    the request made once more."""
    try:
        return _call(uri, what, fn, name, *args, **kwargs)
    except MilvusUnavailable as exc:
        if "load()" not in str(exc) and "not loaded" not in str(exc):
            raise
    _call(uri, "load", client.load_collection, name)
    return _call(uri, what, fn, name, *args, **kwargs)


class MilvusUnavailable(StoreUnavailable):
    """Milvus did not answer a request (the service answers 503)."""

    public = "the catalog's store (Milvus) did not answer"


def _attr_field(name):
    return f"attr_{name}"


def category_key(category):
    """A category path as it is matched: lower case, ``/`` on both ends."""
    return "/" + "/".join(p for p in str(category).strip().lower().split("/") if p) + "/"


def _like(text):
    """``text`` as a literal inside a LIKE pattern of a Milvus string."""
    out = text.replace("\\", "\\\\\\\\")
    for ch in "%_":
        out = out.replace(ch, "\\\\" + ch)
    return out.replace('"', '\\"')


def category_expression(wanted):
    """Milvus' expression for :func:`fashionrec.catalog.category_matches`."""
    key = category_key(wanted)
    if key == "//":
        raise FashionrecError("an empty category matches nothing")
    return f'category_key like "%{_like(key)}%"'


def _quote(value):
    return filters._milvus_value(str(value))


class MilvusStore(CatalogStore):
    """The catalog of a run in Milvus, reached through the alias ``collection``.

    Args:
        uri: see the module doc.
        collection: the alias readers use; each published catalog is a collection
            ``<collection>__<tag>`` behind it.
        class_names, schema, id_kind: the run's classes, attribute schema and id type
            (from its record).
        guard: called before every write (a retired model version raises).
        target: the collection this store reads and writes: a model version's own
            (``run.json`` records it beside the model), or ``None``: the one the
            alias names.
        publisher: this store belongs to the publish under way (its writes do not
            wait for it).

    Writes while a retrain is being published (see :meth:`publishing`) wait for it to
    end and are then redone on the new version; a write that was under way as it began
    is either carried over by it or redone, never lost.
    """

    def __init__(self, uri, collection, class_names, schema=None, id_kind="str", guard=None,
                 ef_search=EF_SEARCH, client=None, target=None, publisher=False):
        if not collection or not collection.replace("_", "a").isalnum() or \
                collection[0].isdigit():
            raise FashionrecError(f"a Milvus collection name is letters, digits and _ "
                                  f"(not starting with a digit), got {collection!r}")
        if "://" not in str(uri):  # a Milvus Lite file: recorded by its absolute path
            uri = Path(uri).expanduser().resolve()
        self.uri, self.collection = str(uri), collection
        self.class_names, self.schema = tuple(class_names), dict(schema or {})
        self.id_kind, self.guard, self.ef_search = id_kind, guard, ef_search
        self.target, self.publisher = target, publisher
        self.client = client or connect(uri)

    def pinned(self, name, publisher=False):
        """This store bound to the collection ``name`` (e.g. one built, not yet
        published)."""
        return MilvusStore(self.uri, self.collection, self.class_names, self.schema,
                           self.id_kind, None if publisher else self.guard, self.ef_search,
                           self.client, name, publisher)

    @property
    def _name(self):
        return self.target or self.collection

    # ------------------------------------------------------------ the record
    def describe(self):
        """What ``run.json`` records (no credentials)."""
        return {"kind": "milvus", "uri": public_uri(self.uri), "collection": self.collection,
                "current": self.target or self.current(), "metric": "L2", "consistency": CONSISTENCY,
                "index": {"type": "HNSW", **HNSW},
                "search": {"ef": self.ef_search, "filter_exact_max": EXACT_MAX,
                           "filter_ef_max": EF_MAX}}

    def current(self):
        """The collection the alias points at, or ``None``."""
        try:
            return self.client.describe_alias(self.collection)["collection_name"]
        except Exception:  # noqa: BLE001 - no such alias
            return None

    # ------------------------------------------------------------ building
    def _schema(self, dim):
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("label", DataType.INT64)
        schema.add_field("category", DataType.VARCHAR, max_length=CATEGORY_MAX)
        schema.add_field("category_key", DataType.VARCHAR, max_length=CATEGORY_MAX + 2)
        schema.add_field("path", DataType.VARCHAR, max_length=PATH_MAX)
        for name, kind in self.schema.items():
            extra = {"max_length": STRING_MAX} if kind == "string" else {}
            schema.add_field(_attr_field(name), getattr(DataType, FIELD_TYPES[kind]),
                             nullable=True, **extra)
        return schema

    def _rows(self, index, start, stop):
        cats = index.all_categories()
        out = []
        for r in range(start, stop):
            row = {"pk": str(index.ids[r]), "vector": np.asarray(index.vectors[r],
                                                                  dtype=np.float32).tolist(),
                   "label": int(index.labels[r]), "category": str(cats[r]),
                   "category_key": category_key(cats[r]),
                   "path": str(index.paths[r]) if index.paths is not None else ""}
            for name, kind in self.schema.items():
                value = attrs.shown(kind, index.attributes[name][r]) if name in \
                    index.attributes else None
                row[_attr_field(name)] = value
            out.append(row)
        return out

    def _check(self, part):
        if part.class_names != self.class_names:
            raise FashionrecError("the new items were embedded for another model")
        if part.images is not None:
            raise FashionrecError("the Milvus store keeps product catalogs (image files), "
                                  "not stored images (Fashion-MNIST runs)")
        if len(part) and part.id_kind != self.id_kind:
            raise FashionrecError(f"this catalog's ids are {self.id_kind}s; the new items' "
                                  f"are not")

    def build(self, index, progress=False):
        """A new collection holding ``index`` (not yet published); returns its name."""
        from pymilvus import MilvusClient
        from tqdm.auto import tqdm

        self._check(index)
        name = f"{self.collection}__{uuid.uuid4().hex[:12]}"
        params = MilvusClient.prepare_index_params()
        params.add_index(field_name="vector", index_type="HNSW", metric_type="L2",
                         params=dict(HNSW))
        _call(self.uri, "create collection", self.client.create_collection, name,
              schema=self._schema(index.dim), index_params=params,
              consistency_level=CONSISTENCY)
        try:
            for start in tqdm(range(0, len(index), BATCH), disable=not progress,
                              desc="milvus insert", unit="batch"):
                rows = self._rows(index, start, min(start + BATCH, len(index)))
                _call(self.uri, "insert", self.client.insert, name, rows)
            _call(self.uri, "flush", self.client.flush, name)
            _call(self.uri, "load", self.client.load_collection, name)
        except BaseException:
            self.client.drop_collection(name)
            raise
        return name

    def publish(self, index, progress=False):
        """Build a collection of ``index`` and switch the alias to it (readers see the
        old catalog or the new one, whole); the collection before the previous one is
        dropped. Returns the new collection's name."""
        name = self.build(index, progress)
        self.switch(name)
        return name

    def switch(self, name):
        """Point the alias at the built collection ``name`` (one request: readers see
        the old catalog or the new one, whole); the collection before the previous one
        is dropped."""
        before = self.current()
        if before is None:
            _call(self.uri, "create alias", self.client.create_alias, name, self.collection)
        else:
            _call(self.uri, "alter alias", self.client.alter_alias, name, self.collection)
        self._bump()
        keep = {name, before}
        prefix = f"{self.collection}__"
        for old in self.client.list_collections():
            if old.startswith(prefix) and old not in keep and old != self._meta_name:
                self.client.drop_collection(old)

    # ------------------------------------------------------------ generation
    @property
    def _meta_name(self):
        return f"{self.collection}__meta"

    def _meta(self):
        from pymilvus import DataType, MilvusClient

        if not self.client.has_collection(self._meta_name):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=ID_MAX + 16)
            schema.add_field("value", DataType.INT64)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector
            params = MilvusClient.prepare_index_params()
            params.add_index(field_name="v", index_type="FLAT", metric_type="L2")
            self.client.create_collection(self._meta_name, schema=schema, index_params=params,
                                          consistency_level=CONSISTENCY)
        return self._meta_name

    def _bump(self):
        _call(self.uri, "write the generation", self.client.upsert, self._meta(),
              [{"pk": "generation", "value": time.time_ns(), "v": [0.0, 0.0]}])

    def _set(self, rows):
        _call(self.uri, "write the record", self.client.upsert, self._meta(),
              [{"value": 1, **r, "v": [0.0, 0.0]} for r in rows])

    def _note(self, kind, pks, unnote):
        """Remember ids added since the model's training, or removed since the catalog
        was first trained (a retrain carries these over, as the file store's history
        does)."""
        for start in range(0, len(pks), BATCH):
            chunk = pks[start:start + BATCH]
            self._set([{"pk": f"{kind}:{p}"} for p in chunk])
            _call(self.uri, "write the record", self.client.delete, self._meta(),
                  ids=[f"{unnote}:{p}" for p in chunk])

    def _noted(self, kind):
        if not self.client.has_collection(self._meta_name):
            return []
        it = _on(self.client, self.uri, self._meta_name, "read the record",
                 self.client.query_iterator, batch_size=BATCH, filter=f'pk like "{kind}:%"',
                 output_fields=["pk"], consistency_level=CONSISTENCY)
        out = []
        while batch := _call(self.uri, "read the record", it.next):
            out += [r["pk"].split(":", 1)[1] for r in batch]
        it.close()
        return out

    @contextlib.contextmanager
    def publishing(self, longest_s=PUBLISH_MAX_S):
        """While a retrain's catalog is caught up and published: writes by others wait
        (a publish that died is forgotten after ``longest_s``)."""
        self._set([{"pk": "publishing", "value": time.time_ns() + int(longest_s * 1e9)}])
        try:
            yield
        finally:
            self._set([{"pk": "publishing", "value": 0}])

    def _publishing(self):
        if self.publisher or not self.client.has_collection(self._meta_name):
            return False
        rows = _on(self.client, self.uri, self._meta_name, "read the record",
                   self.client.query, ids=["publishing"], output_fields=["value"],
                   consistency_level=CONSISTENCY)
        return bool(rows) and int(rows[0]["value"]) > time.time_ns()

    def _wait_published(self):
        deadline = time.monotonic() + PUBLISH_MAX_S
        while self._publishing() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _writable(self):
        """Before a write: the guard, and a publish under way waited for (then the
        guard again: a write for the retired version is redone on the new one)."""
        if self.guard:
            self.guard()
        if self._publishing():
            self._wait_published()
            if self.guard:
                self.guard()

    def _settle(self, pks, present):
        """After a write: if a publish began meanwhile, wait for it; the write stands if
        the published catalog has it (it was carried over), else it is redone."""
        if not self._publishing():
            return  # a publish not begun yet will find this write when it catches up
        self._wait_published()
        live = self._live(pks, self.current())
        if all((p in live) == present for p in pks):
            return
        raise StaleVersion("a retrain was published while this write was made; it is "
                           "made again on the new version")

    def read_with_history(self):
        """``(live catalog, ids added since its model's training, ids removed since
        it was first trained)``, as :meth:`fashionrec.store.IndexStore.read_with_history`."""
        from .index import parse_id

        index = self.snapshot().export()
        live = {str(i) for i in index.ids.tolist()}
        added = [parse_id(p, self.id_kind) for p in self._noted("added") if p in live]
        removed = [parse_id(p, self.id_kind) for p in self._noted("removed")]
        return index, added, removed

    def load(self, search=None, log=None, progress=False, reuse=None):
        """The whole live catalog with its vectors (a :class:`CatalogIndex`)."""
        return self.snapshot().export(progress)

    def generation(self):
        if not self.client.has_collection(self._meta_name):
            return 0
        rows = _on(self.client, self.uri, self._meta_name, "read the generation",
                   self.client.query, ids=["generation"], output_fields=["value"],
                   consistency_level=CONSISTENCY)
        return int(rows[0]["value"]) if rows else 0

    # ------------------------------------------------------------ the contract
    def snapshot(self, search=None, log=None):
        name = self.target or self.current()
        if name is None or not _call(self.uri, "look up", self.client.has_collection, name):
            raise FashionrecError(f"Milvus at {public_uri(self.uri)} has no catalog "
                                  f"{self.collection!r}" + (f" ({name})" if name else ""))
        return MilvusCatalog(self, name)

    def _live(self, pks, name=None):
        found = set()
        for start in range(0, len(pks), 1000):
            chunk = pks[start:start + 1000]
            rows = _on(self.client, self.uri, name or self._name, "query", self.client.query,
                       filter=f"pk in [{', '.join(map(_quote, chunk))}]",
                       output_fields=["pk"], consistency_level=CONSISTENCY)
            found |= {r["pk"] for r in rows}
        return found

    def add(self, part):
        self._check(part)
        self._writable()
        pks = [str(i) for i in part.ids.tolist()]
        live = self._live(pks)
        clash = [(i, p) for i, p in zip(part.ids.tolist(), pks, strict=True) if p in live]
        if clash:  # the file store's words
            raise FashionrecError(f"{len(clash)} id(s) already in the index, e.g. "
                                  f"{clash[0][0]!r}; remove them first")
        for start in range(0, len(part), BATCH):
            _call(self.uri, "insert", self.client.insert, self._name,
                  self._rows(part, start, min(start + BATCH, len(part))))
        self._note("added", pks, "removed")
        self._bump()
        self._settle(pks, present=True)

    def remove(self, ids):
        self._writable()
        from .index import parse_id

        ids = list(dict.fromkeys(parse_id(i, self.id_kind) for i in ids))
        pks = [str(i) for i in ids]
        live = self._live(pks)
        unknown = [i for i, p in zip(ids, pks, strict=True) if p not in live]
        if unknown:
            raise FashionrecError(f"{len(unknown)} id(s) not in the index, e.g. "
                                  f"{unknown[0]!r}; nothing was removed")
        _call(self.uri, "delete", self.client.delete, self._name, ids=pks)
        self._note("removed", pks, "added")
        self._bump()
        self._settle(pks, present=False)

    def compact(self, search=None, progress=False, log=None):
        """Milvus compacts its segments itself; this asks it to now."""
        name = self.target or self.current()
        if name is not None:
            _call(self.uri, "compact", self.client.compact, name)


class MilvusCatalog:
    """A snapshot of a Milvus catalog that holds nothing: each question is a request
    (see the module doc) to the collection the alias named when the snapshot was taken
    (a publish meanwhile does not mix two catalogs into one answer; the collection it
    replaced is kept until the next publish). It answers what :mod:`fashionrec.queries`
    asks of a catalog (``remote`` tells it to ask these methods instead of reading
    columns)."""

    remote = True
    images = None
    query_expansion = None

    def __init__(self, store, collection):
        self.store, self.client, self.uri = store, store.client, store.uri
        self.collection = collection  # what the alias named when the snapshot was taken
        self.class_names, self.schema = store.class_names, store.schema
        self.metadata = {"generation": store.generation()}
        self.base_id = None
        self._fields = [*SCALARS, *map(_attr_field, self.schema)]

    @property
    def id_kind(self):
        return self.store.id_kind

    def parse_id(self, item_id):
        from .index import parse_id

        return parse_id(item_id, self.id_kind)

    def __len__(self):
        return self.count("")

    def _read(self, what, fn, *args, **kwargs):
        return _on(self.client, self.uri, self.collection, what, fn, *args, **kwargs)

    def ping(self):
        """Raise :class:`MilvusUnavailable` unless the catalog answers a request."""
        self._read("ping", self.client.query, filter="", limit=1, output_fields=["pk"])

    def count(self, expression):
        rows = self._read("count", self.client.query,
                          filter=expression, output_fields=["count(*)"],
                          consistency_level=CONSISTENCY)
        return int(rows[0]["count(*)"])

    def record(self, item_id, vector=False):
        """``{"id", "label", "category", "path", "attributes"[, "vector"]}`` of one
        product, or ``None``."""
        try:
            pk = str(self.parse_id(item_id))
        except FashionrecError:
            return None
        rows = self._read("get", self.client.query,
                          ids=[pk], output_fields=self._fields + ["vector"] * vector,
                          consistency_level=CONSISTENCY)
        return self._record(rows[0]) if rows else None

    def row_of(self, item_id):
        """A product's record (truthy) or ``None`` (what ``CatalogIndex.row_of`` tells)."""
        return self.record(item_id)

    def _record(self, entity):
        pk = entity["pk"]
        out = {"id": int(pk) if self.id_kind == "int" else pk, "label": int(entity["label"]),
               "category": entity.get("category") or None, "path": entity.get("path") or None,
               "attributes": {name: entity[_attr_field(name)] for name in self.schema
                              if entity.get(_attr_field(name)) is not None}}
        if "vector" in entity:
            out["vector"] = np.asarray(entity["vector"], dtype=np.float32)
        return out

    def expression(self, label=None, category=None, tree=None, exclude=None):
        """The Milvus boolean expression of the filters (``""``: none)."""
        parts = []
        if label is not None:
            parts.append(f"label == {int(label)}")
        if category is not None:
            parts.append(category_expression(category))
        if tree is not None:
            parts.append(filters.to_milvus(tree, _attr_field, nullable=True))
        if exclude is not None:
            parts.append(f"pk != {_quote(exclude)}")
        return " and ".join(f"({p})" for p in parts)

    def nearest(self, vector, k, expression, n=None, total=None):
        """``[(record, distance)]``: the ``k`` nearest products matching ``expression``,
        exactly ``k`` whenever as many match. ``n``: how many products match it and
        ``total``: how many there are, where the caller knows (else counted when needed).

        The local store's rule, in Milvus: a filter that at most :data:`EXACT_MAX`
        products match is ranked exactly (their vectors read in one query: recall 1);
        a broader one is searched in HNSW with ``ef`` widened by the share it keeps
        (``ef_search / share``, at most :data:`EF_MAX`), then widened four-fold while
        the answer is short; still short at :data:`EF_MAX` (a filter far from the
        query), every match is ranked exactly."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        k, ef = int(k), max(self.store.ef_search, int(k))
        if expression and n is None:
            n = self.count(expression)
        if not expression or (total is not None and total - n <= 1):  # no filter, or only
            return self._search(vector, k, expression, ef)  # the query's own product out
        if n <= EXACT_MAX:
            return self._exact(vector, k, expression, n) if n else []
        share = n / max(len(self) if total is None else total, n)
        ef = min(max(math.ceil(ef / share), ef), EF_MAX)
        while True:
            out = self._search(vector, k, expression, ef)
            if len(out) >= k:
                return out
            if ef >= EF_MAX:
                return self._exact(vector, k, expression, n)
            ef = min(ef * 4, EF_MAX)

    def _search(self, vector, k, expression, ef):
        hits = self._read("search", self.client.search,
                          data=[vector.tolist()], limit=k, filter=expression,
                          output_fields=self._fields, consistency_level=CONSISTENCY,
                          search_params={"metric_type": "L2", "params": {"ef": int(ef)}})[0]
        return [(self._record(h["entity"] | {"pk": h.get("pk", h["entity"].get("pk"))}),
                 math.sqrt(max(float(h["distance"]), 0.0))) for h in hits]

    def _exact(self, vector, k, expression, n):
        """The ``k`` nearest of the ``n`` products matching ``expression``, ranked
        exactly: read in one query up to :data:`EXACT_MAX`, else page by page (the
        best ``k`` kept)."""
        fields = self._fields + ["vector"]
        if n <= EXACT_MAX:
            pages = [self._read("query", self.client.query, filter=expression or "pk != \"\"",
                                output_fields=fields, limit=EXACT_MAX,
                                consistency_level=CONSISTENCY)]
        else:
            pages = self._pages(expression, fields)
        best, best_d = [], np.empty(0, np.float32)
        for rows in pages:
            vectors = np.asarray([r["vector"] for r in rows], np.float32).reshape(-1, len(vector))
            d = np.sqrt(np.maximum(((vectors - vector) ** 2).sum(1), 0.0))
            best, best_d = best + rows, np.concatenate([best_d, d])
            keep = np.argsort(best_d, kind="stable")[:k]
            best, best_d = [best[i] for i in keep], best_d[keep]
        return [(self._record({key: v for key, v in row.items() if key != "vector"}), float(d))
                for row, d in zip(best, best_d, strict=True)]

    def _pages(self, expression, fields):
        it = self._read("read", self.client.query_iterator, batch_size=BATCH,
                        filter=expression, output_fields=fields, consistency_level=CONSISTENCY)
        try:
            while batch := _call(self.uri, "read", it.next):
                yield batch
        finally:
            it.close()

    def export(self, progress=False):
        """Every product with its vector, as a :class:`~fashionrec.index.CatalogIndex`
        (to move the catalog back into files)."""
        from tqdm.auto import tqdm

        from .index import CatalogIndex

        rows = []
        with tqdm(desc="milvus read", unit="item", disable=not progress) as bar:
            for batch in self._pages("", self._fields + ["vector"]):
                rows += [self._record(r) for r in batch]
                bar.update(len(batch))
        rows.sort(key=lambda r: str(r["id"]))
        raw = {name: [r["attributes"].get(name) for r in rows] for name in self.schema}
        dim = len(rows[0]["vector"]) if rows else 0
        return CatalogIndex(
            np.asarray([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), dim),
            [r["id"] for r in rows], [r["label"] for r in rows], self.class_names,
            paths=[r["path"] or "" for r in rows],
            categories=[r["category"] or "" for r in rows], schema=self.schema,
            attributes=attrs.columns(self.schema, raw, len(rows)))

    def browse(self, expression, offset, limit):
        """``(total, [record])`` of the products matching ``expression``, ``limit`` from
        ``offset`` (ordered by id)."""
        total = self.count(expression)
        rows = self._read("query", self.client.query,
                          filter=expression or "pk != \"\"", output_fields=self._fields,
                          offset=int(offset), limit=int(limit), consistency_level=CONSISTENCY)
        return total, [self._record(r) for r in sorted(rows, key=lambda r: r["pk"])]
