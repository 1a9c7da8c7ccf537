"""What a query answers: the items nearest to it, and how they are shown."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Item:
    """One recommended catalog item."""

    rank: int
    id: int | str  # a test-split index (Fashion-MNIST) or a product id
    label: int
    class_name: str
    distance: float
    category: str | None = None
    path: str | None = None  # the product's image file, for file catalogs
    attributes: dict | None = None  # the product's attributes (fashionrec.attributes)


@dataclass
class Recommendation:
    """A query and its nearest catalog items, nearest first."""

    query: dict
    items: list = field(default_factory=list)
    # the query image: 2-D gray (Fashion-MNIST) or (H, W, 3) RGB (a product catalog)
    image: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self):
        return {"query": self.query,
                "items": [{k: v for k, v in vars(i).items() if v is not None}
                          for i in self.items]}

    def format_text(self):
        q = self.query
        if q["kind"] == "test_index":
            head = f"query: test image {q['test_index']} (true: {q['true_class']}"
            head += f", predicted: {q['predicted_class']} p={q['probability']:.2f})"
        elif q["kind"] == "item":
            head = f"query: catalog item {q['id']} ({q['true_class']}, category {q['category']})"
        else:
            head = f"query: {q.get('source', 'image')} (predicted: {q['predicted_class']}"
            head += f" p={q['probability']:.2f})"
        if q.get("filter"):
            head += f"\nonly: {q['filter']} ({q['n_candidates']} candidates)"
        id_title = "catalog idx" if all(isinstance(i.id, int) for i in self.items) else "item id"
        width = max([len(id_title)] + [len(str(i.id)) for i in self.items])
        cwidth = max([12] + [len(i.class_name) for i in self.items])
        shown = self.shown_attributes()
        widths = [max([len(a)] + [len(_cell(i, a)) for i in self.items]) for a in shown]
        extra = "".join(f"  {a:<{w}}" for a, w in zip(shown, widths, strict=True))
        lines = [head, f"{'rank':>4}  {id_title:>{width}}  {'class':<{cwidth}}  "
                       f"{'distance':>9}{extra}"]
        for it in self.items:
            cells = "".join(f"  {_cell(it, a):<{w}}" for a, w in zip(shown, widths,
                                                                       strict=True))
            lines.append(f"{it.rank:>4}  {it.id!s:>{width}}  {it.class_name:<{cwidth}}  "
                         f"{it.distance:>9.4f}{cells}".rstrip())
        return "\n".join(lines)

    def shown_attributes(self):
        """The attributes a table shows: the product's name (when the catalog has one)
        and those the query's filter reads."""
        from .attributes import NAME_ATTRIBUTES
        from .filters import names, parse

        present = {k for i in self.items for k in (i.attributes or {})}
        name = [n for n in NAME_ATTRIBUTES if n in present][:1]
        used = names(parse(self.query["where"])) if self.query.get("where") else []
        return list(dict.fromkeys(name + [a for a in used if a in present]))


def _cell(item, name, width=40):
    value = (item.attributes or {}).get(name)
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[:width - 1] + "…"
