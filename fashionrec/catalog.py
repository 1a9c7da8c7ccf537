"""Stage 1 (own products) — catalog: a shop's product images, from an image folder
or a CSV manifest, checked image by image.

Two layouts are read:

* an image folder, ``root/<category>/<subcategory>/.../<file>`` (like UT Zappos50K's
  ``Shoes/Boots/Brand/*.jpg``): an item's id is its path below ``root``; its class
  is its first folder level, or the first ``label_depth`` levels joined by ``/``;
  its category is its whole folder path. A folder whose top level is ``train/``,
  ``validation/`` (or ``val/``) and ``test/`` is read as split folders: class and
  category start one level below the split, and each item keeps its split;
* a CSV manifest (like Kaggle's Fashion Product Images ``styles.csv`` beside
  ``images/<id>.jpg``): an id column, a label column of your choice, and either an
  image-path column or an id -> path pattern such as ``images/{id}.jpg``; paths are
  relative to the CSV's folder (and must stay inside it unless ``allow_outside``);
  optional category columns are joined by ``/``; the other columns (or those named)
  are the products' attributes (:mod:`fashionrec.attributes`).

A folder catalog takes its attributes from a sidecar CSV or JSON-lines file by id
(``attributes_file``).

:meth:`Catalog.check` then reads every image once (JPEG, PNG, WebP; colour, gray or
with alpha; up to :data:`~fashionrec.images.MAX_PIXELS` pixels) with
:mod:`fashionrec.images`: unreadable, foreign, too large or corrupt files, missing
files, rows without a label, duplicate ids and classes with too few images are
skipped, counted and listed in a report, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .attributes import name_problem, read_sidecar
from .errors import FashionrecError
from .ids import check_id, id_problem
from .images import (  # noqa: F401  (image code lives in .images; names kept here)
    IMAGE_EXTENSIONS,
    ImageFiles,
    decode_image,
    fit_square,
    fit_views,
    image_from_array,
    open_image,
    pil_from_array,
    read_image,
    verify_image,
)

# split folders (Keras image_dataset_from_directory users' layout) -> the split's name
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation",
                 "test": "test"}


@dataclass
class Catalog:
    """Products to index: one id, image path, class and category per item.

    Build one with :meth:`from_folder`, :meth:`from_csv`, :meth:`from_files` or
    :meth:`read` (either layout, by path); :meth:`check` reads the images.

    Attributes:
        ids: item ids (strings, unique).
        paths: image files (absolute).
        labels: class names; ``None`` where unknown (a new product: the head predicts it).
        categories: ``/``-joined category paths used by category filters.
        source: how the catalog was read (layout and options), saved with a run.
        splits: each item's split (``train``, ``validation``, ``test``) when the
            catalog came in split folders, else ``None``.
        skipped: ``{"id", "path", "reason"}`` of every listed item left out so far.
        sha256: the image files' SHA-256, once :meth:`check` has read them.
        attributes: ``{name: values}`` (text or JSON values, one per item; ``""``:
            missing), or ``None``; typed by :func:`fashionrec.attributes.infer_schema`.

    Example:
        >>> cat = Catalog.read("data/demo-catalog/folder")          # doctest: +SKIP
        >>> clean, report = cat.check(min_class_size=5)              # doctest: +SKIP
        >>> print(format_report(report))                             # doctest: +SKIP
    """

    ids: list
    paths: list
    labels: list
    categories: list
    source: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    sha256: list | None = None
    splits: list | None = None
    attributes: dict | None = None

    def __post_init__(self):
        n = len(self.ids)
        if not len(self.paths) == len(self.labels) == len(self.categories) == n or (
                self.splits is not None and len(self.splits) != n) or any(
                len(v) != n for v in (self.attributes or {}).values()):
            raise FashionrecError("catalog columns disagree in length")

    def __len__(self):
        return len(self.ids)

    # ------------------------------------------------------------ readers
    @classmethod
    def read(cls, path, label_depth=1, label_column="label", id_column="id",
             image_column=None, image_pattern="images/{id}.jpg", category_columns=None,
             allow_outside=False, attribute_columns=None, attributes_file=None):
        """A folder (image-folder layout) or a ``.csv`` file (manifest layout;
        ``allow_outside``: see :meth:`from_csv` and :meth:`from_folder`)."""
        path = Path(path)
        if path.is_dir():
            return cls.from_folder(path, label_depth, allow_outside, attributes_file)
        if path.is_file() and path.suffix.lower() == ".csv":
            if attributes_file:
                raise FashionrecError("a CSV catalog keeps its attributes in its own "
                                      "columns (--attributes), not in an attributes file")
            return cls.from_csv(path, label_column, id_column, image_column, image_pattern,
                                category_columns, allow_outside, attribute_columns)
        if not path.exists():
            raise FashionrecError(f"catalog {path} does not exist")
        raise FashionrecError(f"catalog {path} is neither a folder of images nor a .csv file")

    @classmethod
    def from_folder(cls, root, label_depth=1, allow_outside=False, attributes_file=None):
        """Every file below ``root``; class = the first ``label_depth`` folder levels
        (below the split folder, when ``root`` holds ``train/``, ``validation/`` or
        ``val/``, and ``test/``: see :func:`split_folders`). A symbolic link to a file
        outside ``root`` is skipped unless ``allow_outside``. ``attributes_file``: a
        CSV (an ``id`` column) or JSON-lines file of the products' attributes by id
        (an id is the image's path below ``root``)."""
        root = Path(root)
        if not root.is_dir():
            raise FashionrecError(f"catalog folder {root} does not exist")
        if isinstance(label_depth, bool) or not isinstance(label_depth, int) or label_depth < 1:
            raise FashionrecError(f"label_depth must be an integer >= 1, got {label_depth!r}")
        split_names = split_folders(root)
        inside = root.resolve()
        ids, paths, labels, categories, skipped, splits = [], [], [], [], [], []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue  # hidden files and folders (.DS_Store, .git, our temp files)
            item = {"id": rel.as_posix(), "path": str(path)}
            folders = rel.parts[:-1]
            if split_names and not folders and path.suffix.lower() in IMAGE_EXTENSIONS:
                skipped.append(_skip(item, "no split folder",
                                     f"not inside one of {', '.join(split_names)}"))
                continue
            if split_names and folders:
                split, folders = SPLIT_FOLDERS[folders[0].lower()], folders[1:]
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(_skip(item, "not an image file",
                                     f"extension {path.suffix or '(none)'} is not one of "
                                     f"{', '.join(IMAGE_EXTENSIONS)}"))
            elif id_problem(item["id"]):
                skipped.append(_skip(item, "bad id", id_problem(item["id"])))
            elif not allow_outside and not path.resolve().is_relative_to(inside):
                skipped.append(_skip(item, "outside the catalog", (
                    f"a link to {path.resolve()}, outside the catalog folder; allow it "
                    f"with allow_outside (--allow-outside)")))
            elif len(folders) < label_depth:
                skipped.append(_skip(item, "no class folder",
                                     f"fewer than {label_depth} folder level(s) above it"))
            else:
                ids.append(rel.as_posix())
                paths.append(path.resolve())
                labels.append("/".join(folders[:label_depth]))
                categories.append("/".join(folders))
                if split_names:
                    splits.append(split)
        source = {"layout": "folder", "root": str(root.resolve()), "label_depth": label_depth}
        if allow_outside:
            source["allow_outside"] = True
        if split_names:
            source["split_folders"] = split_names
        attrs = None
        if attributes_file:
            attrs = read_sidecar(attributes_file, ids)
            source["attributes_file"] = str(Path(attributes_file).resolve())
        return cls(ids, paths, labels, categories, source, skipped,
                   splits=splits if split_names else None, attributes=attrs)

    @classmethod
    def from_csv(cls, csv_path, label_column="label", id_column="id", image_column=None,
                 image_pattern="images/{id}.jpg", category_columns=None, allow_outside=False,
                 attribute_columns=None):
        """Rows of a CSV manifest; image paths relative to the CSV's folder.

        Args:
            csv_path: the manifest.
            label_column: the column holding each item's class.
            id_column: the column holding each item's id.
            image_column: a column holding each image's path; else ``image_pattern``.
            image_pattern: an id -> path pattern, ``{id}`` replaced by the id.
            category_columns: columns joined by ``/`` into the item's category
                (default: the label column).
            allow_outside: let rows name images outside the CSV's folder (absolute
                paths, ``..``, symlinks leading out); by default such rows are skipped,
                as the service shows every catalog image to anyone who asks.
            attribute_columns: the columns kept as product attributes (a list or a
                comma-separated string; ``"none"``: none). Default: every column but
                the id, image and label ones whose name the filter language can
                address (the others are listed in ``source["attributes_skipped"]``).
        """
        csv_path = Path(csv_path)
        base = csv_path.parent
        if image_column is None and "{id}" not in (image_pattern or ""):
            raise FashionrecError(f"image_pattern must contain {{id}}, got {image_pattern!r}")
        if isinstance(category_columns, str):
            category_columns = [c for c in category_columns.split(",") if c]
        category_columns = list(category_columns or [label_column])
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                columns = list(reader.fieldnames or [])
                wanted = [id_column, label_column, *category_columns]
                wanted += [image_column] if image_column else []
                missing = [c for c in dict.fromkeys(wanted) if c not in columns]
                if missing:
                    raise FashionrecError(
                        f"{csv_path} has no column {', '.join(map(repr, missing))}; its columns "
                        f"are {', '.join(columns) or '(none)'}")
                rows = list(reader)
                attr_names, attrs_skipped = _attribute_columns(
                    csv_path, columns, attribute_columns,
                    {id_column, label_column, image_column})
        except FileNotFoundError:
            raise FashionrecError(f"catalog manifest {csv_path} does not exist") from None
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise FashionrecError(f"cannot read catalog manifest {csv_path} ({exc})") from None
        ids, paths, labels, categories, skipped, seen = [], [], [], [], [], set()
        attrs = {name: [] for name in attr_names}
        inside = None if allow_outside else base.resolve()
        for line, row in enumerate(rows, start=2):
            item_id = (row.get(id_column) or "").strip()
            label = (row.get(label_column) or "").strip()
            rel = (row.get(image_column) or "").strip() if image_column else (
                image_pattern.replace("{id}", item_id))
            path = base / rel
            item = {"id": item_id, "path": str(path), "line": line}
            problem = _csv_row_problem(item, label, rel, seen, inside, id_column, label_column)
            if problem:
                skipped.append(_skip(item, *problem))
                continue
            seen.add(item_id)
            ids.append(item_id)
            paths.append(path.resolve())
            labels.append(label)
            categories.append("/".join((row.get(c) or "").strip() for c in category_columns))
            for name in attr_names:
                attrs[name].append((row.get(name) or "").strip())
        source = {"layout": "csv", "manifest": str(csv_path.resolve()), "id_column": id_column,
                  "label_column": label_column, "image_column": image_column,
                  "image_pattern": None if image_column else image_pattern,
                  "category_columns": category_columns, "attribute_columns": attr_names}
        if attrs_skipped:
            source["attributes_skipped"] = attrs_skipped
        if allow_outside:
            source["allow_outside"] = True
        return cls(ids, paths, labels, categories, source, skipped,
                   attributes=attrs or None)

    @classmethod
    def from_files(cls, paths, ids=None, labels=None, categories=None, attributes=None):
        """Loose image files (e.g. new products); ids default to the file names (every
        id checked by :func:`fashionrec.ids.check_id`); ``attributes``: ``{name:
        values}``, one value per file."""
        paths = [Path(p) for p in paths]
        ids = [check_id(i) for i in ([p.name for p in paths] if ids is None else ids)]
        labels = [None] * len(paths) if labels is None else list(labels)
        if len(ids) != len(paths) or len(labels) != len(paths):
            raise FashionrecError("give one id and one label per image file")
        twice = [i for i, n in Counter(ids).items() if n > 1]
        if twice:
            raise FashionrecError(f"two images would share the id {twice[0]!r}; give each "
                                  f"its own id")
        for p in paths:
            if not p.is_file():
                raise FashionrecError(f"image {p} does not exist")
        categories = [lab or "" for lab in labels] if categories is None else list(categories)
        return cls(ids, [p.resolve() for p in paths], labels, categories,
                   {"layout": "files"}, [], attributes=attributes)

    # ------------------------------------------------------------ checking
    def subset(self, keep):
        """The items at positions ``keep`` (skipped list and source kept)."""
        keep = list(keep)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return replace(self, ids=pick(self.ids), paths=pick(self.paths),
                       labels=pick(self.labels), categories=pick(self.categories),
                       skipped=list(self.skipped),
                       sha256=None if self.sha256 is None else pick(self.sha256),
                       splits=None if self.splits is None else pick(self.splits),
                       attributes=None if self.attributes is None else
                       {k: pick(v) for k, v in self.attributes.items()})

    def check(self, min_class_size=1, progress=True, decode=True):
        """Read every image file once; return ``(clean catalog, report)``.

        Unreadable images, and (when ``min_class_size`` > 1) every item of a class
        with fewer images than that, are left out and listed in the report. The
        clean catalog knows each file's SHA-256 (the feature cache is keyed by them).
        With ``decode=False`` only each file's header is read (missing, empty and
        non-image files are caught, a truncated one is not): training decodes every
        image once, in the extractor's background workers, and reports those there
        (:func:`drop_failed`).
        """
        keep, digests, skipped = [], [], list(self.skipped)
        for i in tqdm(range(len(self)), desc="check images", unit="img", disable=not progress,
                      dynamic_ncols=True):
            item = {"id": self.ids[i], "path": str(self.paths[i])}
            try:
                digest = verify_image(self.paths[i], decode)
            except FashionrecError as exc:
                kind = "unreadable image" if self.paths[i].is_file() else "image file missing"
                skipped.append(_skip(item, kind, str(exc)))
                continue
            keep.append(i)
            digests.append(digest)
        counts = Counter(self.labels[i] for i in keep if self.labels[i] is not None)
        small = {c: n for c, n in sorted(counts.items()) if n < min_class_size}
        for i in keep:
            if self.labels[i] in small:
                skipped.append(_skip(
                    {"id": self.ids[i], "path": str(self.paths[i])}, "class too small",
                    f"class {self.labels[i]!r} has {small[self.labels[i]]} image(s), "
                    f"fewer than min_class_size {min_class_size}"))
        pairs = [(i, d) for i, d in zip(keep, digests, strict=True) if self.labels[i] not in small]
        keep, digests = [i for i, _ in pairs], [d for _, d in pairs]
        clean = self.subset(keep)
        clean.sha256, clean.skipped = digests, []
        report = {
            "source": self.source,
            "n_listed": len(self) + len(self.skipped),
            "n_ok": len(clean),
            "n_skipped": len(skipped),
            "skipped_by_kind": dict(Counter(s["kind"] for s in skipped)),
            "min_class_size": min_class_size,
            "class_counts": {c: n for c, n in sorted(counts.items()) if c not in small},
            "small_classes": small,
            "skipped": skipped,
        }
        return clean, report

    def drop_failed(self, failed, report):
        """This (checked) catalog without the rows in ``failed`` (row -> reason: images
        that did not decode during extraction), and ``report`` updated to say so."""
        if not failed:
            return self, report
        skipped = [_skip({"id": self.ids[r], "path": str(self.paths[r])}, "unreadable image",
                         reason) for r, reason in sorted(failed.items())]
        clean = self.subset([i for i in range(len(self)) if i not in failed])
        counts = Counter(label for label in clean.labels if label is not None)
        all_skipped = report["skipped"] + skipped
        return clean, {**report, "n_ok": len(clean), "n_skipped": len(all_skipped),
                       "skipped_by_kind": dict(Counter(s["kind"] for s in all_skipped)),
                       "class_counts": dict(sorted(counts.items())), "skipped": all_skipped}

    def content_digest(self):
        """One SHA-256 over all image files, in order (after :meth:`check`)."""
        if self.sha256 is None:
            raise FashionrecError("call check() first: the catalog's images are not read yet")
        h = hashlib.sha256()
        for item_id, digest in zip(self.ids, self.sha256, strict=True):
            h.update(f"{item_id}\0{digest}\n".encode())
        return h.hexdigest()

    def images(self, size, fit="pad", mirror=False, views=None):
        """The images as a lazy ``(N, size, size, 3)`` uint8 sequence (decoded per batch);
        with ``views`` (``(fit, mirror)`` pairs) ``(N, len(views), size, size, 3)``, each
        file decoded once for all of them."""
        return ImageFiles(self.paths, size, fit, mirror, views)


def split_folders(root):
    """The split folders at the top of ``root`` (``["train", "validation", "test"]``,
    as named on disk), or ``[]`` when ``root`` is not laid out in splits: its
    top-level folders must all be split names, ``train`` one of them, and at least
    one other split beside it."""
    tops = sorted(p.name for p in Path(root).iterdir()
                  if p.is_dir() and not p.name.startswith("."))
    names = [SPLIT_FOLDERS.get(t.lower()) for t in tops]
    if not tops or None in names or "train" not in names or len(set(names)) < 2:
        return []
    if len(set(names)) < len(names):
        raise FashionrecError(f"catalog folder {root} has both val/ and validation/; "
                              f"keep one")
    return tops


def assign_splits(catalog, holdout=None, seed=1234):
    """Each item's role in training: ``"train"`` (fits the head), ``"validation"``
    (the head's validation curve, never fitted) or ``"heldout"`` (never seen in
    training; the honest queries of ``evaluate``).

    Split folders decide by themselves (``test/`` is held out). Otherwise
    ``holdout`` (a share in (0, 1)) of the items is held out, drawn with ``seed`` and
    stratified by class; without it every item trains.
    """
    if catalog.splits is not None:
        if holdout:
            raise FashionrecError("the catalog comes in split folders: its test/ products "
                                  "are the held-out ones; drop --holdout")
        return np.array([{"test": "heldout"}.get(s, s) for s in catalog.splits], dtype=object)
    roles = np.full(len(catalog), "train", dtype=object)
    if not holdout:
        return roles
    if not 0.0 < holdout < 1.0:
        raise FashionrecError(f"holdout must be a share in (0, 1), got {holdout!r}")
    from sklearn.model_selection import train_test_split

    try:
        _, held = train_test_split(np.arange(len(catalog)), test_size=holdout,
                                   random_state=seed, stratify=catalog.labels)
    except ValueError as exc:
        raise FashionrecError(f"cannot hold out {holdout:.0%} of the products stratified by "
                              f"class ({exc}); use a larger share or --min-class-size") from None
    roles[held] = "heldout"
    return roles


@dataclass
class CatalogSplit:
    """Which products of a catalog run were kept out of the head's training:
    ``validation`` ones gave its validation curve, ``heldout`` ones were never seen
    (``method``: ``"folders"``, ``"holdout"`` or ``"none"``). Saved as a run's
    ``split.json``."""

    method: str
    validation_ids: list = field(default_factory=list)
    heldout_ids: list = field(default_factory=list)
    holdout: float | None = None
    seed: int | None = None

    @classmethod
    def from_roles(cls, ids, roles, holdout=None, seed=None, split_folders=False):
        roles = np.asarray(roles, dtype=object)
        method = "folders" if split_folders else ("holdout" if holdout else "none")
        return cls(method, [ids[i] for i in np.flatnonzero(roles == "validation")],
                   [ids[i] for i in np.flatnonzero(roles == "heldout")], holdout,
                   seed if holdout else None)

    def summary(self, n_items):
        """Counts per role (what ``run.json`` records beside the file's name)."""
        held, val = len(self.heldout_ids), len(self.validation_ids)
        return {"method": self.method, "holdout": self.holdout, "seed": self.seed,
                "train": n_items - held - val, "validation": val, "heldout": held}

    def to_dict(self):
        return {"method": self.method, "holdout": self.holdout, "seed": self.seed,
                "validation_ids": list(self.validation_ids),
                "heldout_ids": list(self.heldout_ids)}

    @classmethod
    def from_dict(cls, d):
        try:
            return cls(d["method"], list(d["validation_ids"]), list(d["heldout_ids"]),
                       d.get("holdout"), d.get("seed"))
        except (KeyError, TypeError) as exc:
            raise FashionrecError(f"not a catalog split ({exc})") from None


def _attribute_columns(csv_path, columns, wanted, taken):
    """``(attribute columns, columns left out by default)`` of a CSV with
    ``columns``; ``taken``: the id, label and image columns."""
    if isinstance(wanted, str):
        if wanted.strip().lower() == "none":
            return [], []
        wanted = [c.strip() for c in wanted.split(",") if c.strip()]
    if wanted is not None:
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise FashionrecError(f"{csv_path} has no column {', '.join(map(repr, missing))} "
                                  f"for --attributes; its columns are {', '.join(columns)}")
        for c in wanted:
            if c in taken:
                raise FashionrecError(f"--attributes: {c!r} is the id, label or image column")
            if name_problem(c):
                raise FashionrecError(f"--attributes: {name_problem(c)}")
        return list(dict.fromkeys(wanted)), []
    rest = [c for c in columns if c not in taken]
    return ([c for c in rest if not name_problem(c)], [c for c in rest if name_problem(c)])


def _csv_row_problem(item, label, rel, seen, inside, id_column, label_column):
    """``(kind, reason)`` why a CSV row is skipped, or ``None`` for a usable one.
    ``inside``: the (resolved) folder its image must lie in, ``None``: anywhere."""
    item_id, line, path = item["id"], item["line"], Path(item["path"])
    if not item_id:
        return "no id", f"line {line}: empty {id_column}"
    if id_problem(item_id):
        return "bad id", f"line {line}: {id_problem(item_id)}"
    if item_id in seen:
        return "duplicate id", f"line {line}: {id_column} {item_id!r} seen before"
    if not label:
        return "no label", f"line {line}: empty {label_column}"
    if inside is not None and rel and not path.resolve().is_relative_to(inside):
        return "outside the catalog", (
            f"line {line}: {rel} leads outside the catalog's folder {inside} (to "
            f"{path.resolve()}); allow it with allow_outside (--allow-outside)")
    if not rel or not path.is_file():
        return "image file missing", f"{path} does not exist"
    return None


def _skip(item, kind, reason):
    """A skipped item: what it was, a short kind (for counting) and the full reason."""
    return {**item, "kind": kind, "reason": reason}


def format_report(report, max_listed=10):
    """The report as a few lines for a terminal."""
    lines = [f"catalog: {report['n_ok']} of {report['n_listed']} items usable, "
             f"{report['n_skipped']} skipped, {len(report['class_counts'])} classes"]
    if report["skipped_by_kind"]:
        lines.append("  skipped: " + ", ".join(f"{n} {k}"
                                               for k, n in report["skipped_by_kind"].items()))
    if report["small_classes"]:
        lines.append(f"  classes under min_class_size {report['min_class_size']} (left out): "
                     + ", ".join(f"{c} ({n})" for c, n in report["small_classes"].items()))
    lines += format_skipped(report["skipped"], max_listed)
    return "\n".join(lines)


def format_skipped(skipped, max_listed=10):
    """One line per skipped item (the first ``max_listed``)."""
    lines = [f"  - {s['id'] or s['path']}: {s['kind']}: {s['reason']}"
             for s in skipped[:max_listed]]
    if len(skipped) > max_listed:
        lines.append(f"  ... and {len(skipped) - max_listed} more (see the JSON report)")
    return lines


def category_matches(categories, wanted):
    """Boolean mask: items whose ``/``-separated category path contains ``wanted`` as
    whole levels (case-insensitive): ``"Boots"`` and ``"Shoes/Boots"`` both match
    ``"Shoes/Boots/Brand"``."""
    want = "/" + "/".join(p for p in str(wanted).strip().lower().split("/") if p) + "/"
    if want == "//":
        raise FashionrecError("an empty category matches nothing")
    return np.array([want in "/" + str(c).lower() + "/" for c in categories], dtype=bool)
