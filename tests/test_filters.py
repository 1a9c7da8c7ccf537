"""The filter language: parsing, checking against a schema, vectorised evaluation
(against a row-by-row evaluation written here), Milvus expressions, and a corpus of
bad filters that must each give one line naming the problem."""

import math

import numpy as np
import pytest

from fashionrec import FashionrecError
from fashionrec.filters import (
    And,
    Compare,
    Member,
    Not,
    Or,
    compile_filter,
    mask,
    parse,
    to_milvus,
)

SCHEMA = {"gender": "string", "price": "float", "year": "integer", "baseColour": "string",
          "in_stock": "boolean"}


def test_the_example_parses_into_its_tree():
    tree = parse('gender == "Women" and price < 50 and baseColour in ["Red", "Pink"]')
    assert tree == And((Compare("gender", "==", "Women"), Compare("price", "<", 50),
                        Member("baseColour", ("Red", "Pink"))))


def test_precedence_not_then_and_then_or():
    assert parse("a == 1 or b == 2 and not c == 3") == Or((
        Compare("a", "==", 1), And((Compare("b", "==", 2), Not(Compare("c", "==", 3))))))
    assert parse("(a == 1 or b == 2) and c != 'x'") == And((
        Or((Compare("a", "==", 1), Compare("b", "==", 2))), Compare("c", "!=", "x")))
    assert parse("x not in [1, 2.5, -3]") == Member("x", (1, 2.5, -3), negated=True)
    assert parse("s == 'it\\'s' and t == \"a\\\"b\"") == And((
        Compare("s", "==", "it's"), Compare("t", "==", 'a"b')))
    assert parse("flag == true") == Compare("flag", "==", True)


def row_value(row, tree):
    """Row-by-row meaning of a tree (the reference the vectorised mask must match)."""
    if isinstance(tree, And):
        return all(row_value(row, a) for a in tree.args)
    if isinstance(tree, Or):
        return any(row_value(row, a) for a in tree.args)
    if isinstance(tree, Not):
        return not row_value(row, tree.arg)
    v = row[tree.name]
    missing = v is None or (isinstance(v, float) and math.isnan(v))
    if isinstance(tree, Member):
        return (not missing and v in tree.values) != tree.negated
    if missing:
        return tree.op == "!="
    return {"==": v == tree.value, "!=": v != tree.value, "<": v < tree.value,
            "<=": v <= tree.value, ">": v > tree.value, ">=": v >= tree.value}[tree.op]


@pytest.mark.parametrize("text", [
    'gender == "Women" and price < 50 and baseColour in ["Red", "Pink"]',
    'not (gender == "Men" or year <= 2012) and in_stock == true',
    'baseColour not in ["Blue"] or price >= 80.5',
    'price != 20 and not not year > 2015',
    'gender != "Women"',
])
def test_mask_matches_the_row_by_row_meaning(text):
    rng = np.random.default_rng(0)
    n = 300
    cols = {"gender": rng.choice(["Women", "Men", "Unisex"], n).astype(object),
            "price": np.where(rng.random(n) < 0.1, np.nan, rng.integers(5, 100, n) * 1.0),
            "year": rng.integers(2008, 2020, n).astype(float),
            "baseColour": rng.choice(["Red", "Pink", "Blue", "Black"], n).astype(object),
            "in_stock": rng.random(n) < 0.7}
    tree = compile_filter(text, SCHEMA)
    got = mask(tree, cols, n)
    want = [row_value({k: (None if isinstance(v[i], float) and math.isnan(v[i]) else
                           v[i].item() if hasattr(v[i], "item") else v[i])
                       for k, v in cols.items()}, tree) for i in range(n)]
    assert got.tolist() == want
    assert 0 < got.sum() < n  # the corpus above selects some rows and not all


def test_milvus_expression():
    tree = parse('gender == "Women" and price < 50 and not baseColour in ["Red", "Pi\\"nk"]')
    assert to_milvus(tree) == ('(gender == "Women" and price < 50 and '
                               'not (baseColour in ["Red", "Pi\\"nk"]))')
    assert to_milvus(parse("in_stock == false or year not in [2011]"),
                     field=lambda n: f'attrs["{n}"]') == \
        '(attrs["in_stock"] == false or attrs["year"] not in [2011])'


BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("price <", "expected a value"),
    ("price < 50 and", "expected an attribute name, got the end"),
    ("price 50", "expected a comparison"),
    ("price < 50 gender == 'x'", "unexpected 'gender'"),
    ("(price < 50", "expected ')', got the end"),
    ("price < 50)", "unexpected ')'"),
    ("gender == 'Women", "never closed"),
    ("gender = 'Women'", "unexpected character '='"),
    ("baseColour in ['Red' 'Pink']", "expected ',' or ']'"),
    ("baseColour in []", "expected a value"),
    ("__import__('os').system('true')", "unexpected character '.'"),
    ("__import__('os')", "expected a comparison"),
    ("price < 50; drop", "unexpected character ';'"),
    ("colour == 'Red'", "unknown attribute 'colour'"),
    ("price < '50'", "price is a float attribute; \"50\" is a string"),
    ("gender == 3", "gender is a string attribute; 3 is a number"),
    ("in_stock < true", "compare it with == or !="),
    ("in_stock == 1", "in_stock is a boolean attribute"),
    ("year in [2010, 'x']", "year is an integer attribute; \"x\" is a string"),
    ("not " * 60 + "price < 1", "nested more than 50 deep"),
    ("price < 1 or " * 200 + "price < 2", "longer than 2000 characters"),
    ("price < 12abc", "unexpected character"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_filters_are_one_line_errors_naming_the_problem(text, message):
    with pytest.raises(FashionrecError) as err:
        compile_filter(text, SCHEMA)
    assert message in str(err.value) and "\n" not in str(err.value)
