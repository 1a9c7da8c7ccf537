"""The filter language: which products a search may answer with, by their attributes.

    gender == "Women" and price < 50 and baseColour in ["Red", "Pink"]
    not (season == "Winter" or year <= 2012) and in_stock == true

Comparisons ``==  !=  <  <=  >  >=``, membership ``in [..]`` and ``not in [..]``,
``and`` / ``or`` / ``not`` and parentheses (``not`` binds tightest, then ``and``, then
``or``); literals are strings in double or single quotes (backslash escapes the quote),
numbers and ``true`` / ``false``. An attribute is a name of the catalog's schema.

:func:`parse` is a small recursive-descent parser (nothing is ever ``eval``-ed); it
gives a tree of :class:`Compare`, :class:`Member`, :class:`Not`, :class:`And` and
:class:`Or`. :func:`check` checks it against a schema (``{name: "string" | "integer" |
"float" | "boolean"}``); :func:`mask` evaluates it over columns, vectorised;
:func:`to_milvus` writes it as a Milvus boolean expression. Every error is a
:class:`~fashionrec.errors.FashionrecError` of one line that names the problem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from .errors import FashionrecError

TYPES = ("string", "integer", "float", "boolean")
ORDER_OPS = ("<", "<=", ">", ">=")
OPS = ("==", "!=", *ORDER_OPS)
KEYWORDS = ("and", "or", "not", "in", "true", "false")
MAX_LENGTH = 2000  # characters; a filter is a line, not a program
MAX_DEPTH = 50  # nested parentheses / nots

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_]))
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],])
""", re.VERBOSE)


@dataclass(frozen=True)
class Compare:
    name: str
    op: str
    value: object


@dataclass(frozen=True)
class Member:
    name: str
    values: tuple
    negated: bool = False


@dataclass(frozen=True)
class Not:
    arg: object


@dataclass(frozen=True)
class And:
    args: tuple


@dataclass(frozen=True)
class Or:
    args: tuple


def _error(text, pos, what):
    return FashionrecError(f"filter: {what} at position {pos + 1} of {text!r}")


def _tokens(text):
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] in "\"'":
                raise _error(text, pos, "a string that is never closed")
            raise _error(text, pos, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind != "space":
            value = m.group()
            if (kind == "name" and value in KEYWORDS) or kind == "punct":
                kind = value
            out.append((kind, value, pos))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


def _literal(kind, value):
    if kind == "number":
        number = float(value)
        return int(number) if re.fullmatch(r"[-+]?\d+", value) else number
    if kind == "string":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value == "true"


class _Parser:
    def __init__(self, text):
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self):
        return self.toks[self.i]

    def take(self, *kinds):
        kind, value, pos = self.toks[self.i]
        if kinds and kind not in kinds:
            want = " or ".join(repr(k) if k in ("(", ")", "[", "]", ",") else k
                               for k in kinds)
            got = "the end" if kind == "end" else repr(value)
            raise _error(self.text, pos, f"expected {want}, got {got}")
        self.i += 1
        return kind, value, pos

    def parse(self):
        tree = self.or_()
        kind, value, pos = self.peek()
        if kind != "end":
            raise _error(self.text, pos, f"unexpected {value!r} (join conditions with "
                                         f"'and' or 'or')")
        return tree

    def joined(self, word, part, node):
        """``part (word part)*``: one part, or ``node`` of them all."""
        args = [part()]
        while self.peek()[0] == word:
            self.take()
            args.append(part())
        return args[0] if len(args) == 1 else node(tuple(args))

    def or_(self):
        return self.joined("or", self.and_, Or)

    def and_(self):
        return self.joined("and", self.not_, And)

    def not_(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(self.text, self.peek()[2], f"nested more than {MAX_DEPTH} deep")
        try:
            if self.peek()[0] == "not":
                self.take()
                return Not(self.not_())
            if self.peek()[0] == "(":
                self.take()
                tree = self.or_()
                self.take(")")
                return tree
            return self.condition()
        finally:
            self.depth -= 1

    def value(self):
        kind, value, pos = self.peek()
        if kind not in ("number", "string", "true", "false"):
            got = "the end" if kind == "end" else repr(value)
            raise _error(self.text, pos, f"expected a value (a \"string\", a number, true "
                                         f"or false), got {got}")
        self.take()
        return _literal(kind, value)

    def condition(self):
        kind, name, pos = self.peek()
        if kind != "name":
            got = "the end" if kind == "end" else repr(name)
            raise _error(self.text, pos, f"expected an attribute name, got {got}")
        self.take()
        kind, value, pos = self.peek()
        if kind == "op":
            self.take()
            return Compare(name, value, self.value())
        negated = kind == "not"
        if negated:
            self.take()
            kind, value, pos = self.peek()
        if kind == "in":
            self.take()
            self.take("[")
            values = [self.value()]
            while self.peek()[0] != "]":
                self.take(",", "]")
                values.append(self.value())
            self.take("]")
            return Member(name, tuple(values), negated)
        got = "the end" if kind == "end" else repr(value)
        raise _error(self.text, pos, f"expected a comparison (==, !=, <, <=, >, >=) or "
                                     f"'in [...]' after {name!r}, got {got}")


def parse(text):
    """The tree of a filter (see the module doc); a syntax error raises."""
    if not isinstance(text, str) or not text.strip():
        raise FashionrecError("filter: empty; write a condition such as price < 50")
    if len(text) > MAX_LENGTH:
        raise FashionrecError(f"filter: longer than {MAX_LENGTH} characters")
    return _Parser(text).parse()


def _kind(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string"


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _conditions(tree):
    if isinstance(tree, (And, Or)):
        for arg in tree.args:
            yield from _conditions(arg)
    elif isinstance(tree, Not):
        yield from _conditions(tree.arg)
    else:
        yield tree


def check(tree, schema):
    """``tree`` if every condition fits ``schema``; else a one-line error naming the
    attribute and what is wrong."""
    for cond in _conditions(tree):
        if cond.name not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise FashionrecError(f"filter: unknown attribute {cond.name!r} (this catalog "
                                  f"has: {known})")
        kind = schema[cond.name]
        want = {"string": "string", "integer": "number", "float": "number",
                "boolean": "boolean"}[kind]
        values = cond.values if isinstance(cond, Member) else (cond.value,)
        for value in values:
            if _kind(value) != want:
                raise FashionrecError(
                    f"filter: {cond.name} is {_a(kind)} attribute; {json.dumps(value)} is "
                    f"{_a(_kind(value))}")
        if isinstance(cond, Compare) and cond.op in ORDER_OPS and kind == "boolean":
            raise FashionrecError(f"filter: {cond.name} is a boolean attribute; compare it "
                                  f"with == or !=, not {cond.op}")
    return tree


def names(tree):
    """The attributes ``tree`` reads, in order of first use."""
    return list(dict.fromkeys(cond.name for cond in _conditions(tree)))


def compile_filter(text, schema):
    """:func:`parse` then :func:`check`."""
    return check(parse(text), schema)


_COMPARE = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
            ">": np.greater, ">=": np.greater_equal}


def mask(tree, columns, n):
    """Boolean ``(n,)`` mask of the rows that match, from ``columns`` (``{name: (n,)
    array}``: strings as objects or ``str``, numbers as float with NaN for missing,
    booleans as ``bool``; a missing value matches no comparison but ``!=`` and ``not
    in``)."""
    if isinstance(tree, And):
        out = np.ones(n, dtype=bool)
        for arg in tree.args:
            out &= mask(arg, columns, n)
        return out
    if isinstance(tree, Or):
        out = np.zeros(n, dtype=bool)
        for arg in tree.args:
            out |= mask(arg, columns, n)
        return out
    if isinstance(tree, Not):
        return ~mask(tree.arg, columns, n)
    col = np.asarray(columns[tree.name])
    if isinstance(tree, Member):
        hit = np.isin(col, np.asarray(tree.values, dtype=col.dtype if col.dtype.kind in
                                      "fb" else object))
        return ~hit if tree.negated else hit
    with np.errstate(invalid="ignore"):
        return np.asarray(_COMPARE[tree.op](col, tree.value), dtype=bool)


def _milvus_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # double quotes, backslash escapes: Milvus' string syntax


def to_milvus(tree, field=lambda name: name, nullable=False):
    """The filter as a Milvus boolean expression; ``field(name)`` is how an attribute
    is addressed (a scalar field, or ``attrs["name"]`` in a JSON field). With
    ``nullable`` (fields where a missing value is null) each condition says what a
    missing value does, as :func:`mask` has it: it matches ``!=`` and ``not in`` only
    (so ``not`` over the whole stays two-valued)."""
    if isinstance(tree, (And, Or)):
        joiner = " and " if isinstance(tree, And) else " or "
        return "(" + joiner.join(to_milvus(a, field, nullable) for a in tree.args) + ")"
    if isinstance(tree, Not):
        return f"not ({to_milvus(tree.arg, field, nullable)})"
    name = field(tree.name)
    if isinstance(tree, Member):
        values = ", ".join(_milvus_value(v) for v in tree.values)
        text = f"{name} {'not in' if tree.negated else 'in'} [{values}]"
        negative = tree.negated
    else:
        text = f"{name} {tree.op} {_milvus_value(tree.value)}"
        negative = tree.op == "!="
    if not nullable:
        return text
    return f"({name} is null or {text})" if negative else f"({name} is not null and {text})"
