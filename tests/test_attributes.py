"""Product attributes and filtered search: a styles.csv-like catalog trained through the
CLI, ``--where`` and ``add --attr``, the folder sidecar, the HDF5 round trip, the
service's ``where=`` and attribute uploads, and a retrain that keeps added products'
attributes."""

import json
import shutil

import numpy as np
import pytest
from catalogs import CLASSES, EXPECTED_SCHEMA, draw_product, make_styles, matches

from fashionrec import FashionrecError, Recommender
from fashionrec import attributes as attrs
from fashionrec.catalog import Catalog
from fashionrec.cli import main
from fashionrec.index import CatalogIndex


@pytest.fixture(scope="module")
def styles(tmp_path_factory):
    """The styles catalog trained through the CLI once: ``(run_dir, rows, root)``."""
    root = tmp_path_factory.mktemp("styles")
    rows = make_styles(root)
    run = tmp_path_factory.mktemp("styles-run") / "run"
    assert main(["train", "--catalog", str(root / "styles.csv"), "--label-column",
                 "articleType", "--image-size", "32", "--weights", "none", "--epochs", "2",
                 "--run-dir", str(run), "--no-progress"]) == 0
    return run, rows, root


@pytest.fixture
def styles_copy(styles, tmp_path):
    run, rows, root = styles
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", rows, root


def recommend_json(capsys, run, *args):
    capsys.readouterr()
    assert main(["recommend", "--run-dir", str(run), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ the module alone
def test_types_are_inferred_from_the_values():
    assert attrs.infer_type(["true", "False", ""]) == "boolean"
    assert attrs.infer_type(["2012", "-3", ""]) == "integer"
    assert attrs.infer_type(["2012", "3.5"]) == "float"
    assert attrs.infer_type(["2012", "n/a"]) == "string"
    assert attrs.infer_type(["", ""]) == "string"
    cols = attrs.columns({"p": "float", "s": "boolean", "c": "string"},
                         {"p": ["1.5", ""], "s": ["true", "false"], "c": ["Red", ""]}, 2)
    assert cols["p"][0] == 1.5 and np.isnan(cols["p"][1])
    assert cols["s"].tolist() == [1.0, 0.0] and cols["c"].tolist() == ["Red", ""]


def test_values_that_do_not_fit_are_one_line_errors():
    with pytest.raises(FashionrecError, match=r"product b: attribute price is a float; "
                                              r"'cheap' is not"):
        attrs.columns({"price": "float"}, {"price": ["3", "cheap"]}, 2, ["a", "b"])
    with pytest.raises(FashionrecError, match="attribute year is an integer; 2012.5"):
        attrs.convert("year", "integer", 2012.5)
    with pytest.raises(FashionrecError, match="attribute in_stock is a boolean; 1 is not"):
        attrs.convert("in_stock", "boolean", 1)
    with pytest.raises(FashionrecError, match="unknown attribute 'colour'"):
        attrs.given({"price": "float"}, {"colour": "Red"})
    with pytest.raises(FashionrecError, match="--attr takes key=value"):
        attrs.parse_assignments(["price"])


def test_the_index_keeps_attributes_through_save_load_and_concat(tmp_path):
    schema = {"price": "float", "colour": "string"}
    a = CatalogIndex(np.eye(3, 4, dtype=np.float32), ["a", "b", "c"], [0, 1, 0], ["x", "y"],
                     attributes=attrs.columns(schema, {"price": ["1", "", "3.5"],
                                                       "colour": ["Red", "Blue", ""]}, 3),
                     schema=schema)
    a.save(tmp_path / "i.h5")
    b = CatalogIndex.load(tmp_path / "i.h5")
    assert b.schema == schema
    assert [attrs.row(schema, b.attributes, r) for r in range(3)] == [
        {"price": 1.0, "colour": "Red"}, {"colour": "Blue"}, {"price": 3.5}]
    # a part without the attributes (e.g. an older segment) gives missing values
    bare = CatalogIndex(np.ones((1, 4), dtype=np.float32), ["d"], [1], ["x", "y"])
    both = CatalogIndex.concat([b, bare], [np.array([2, 0]), None])
    assert both.ids.tolist() == ["c", "a", "d"]
    assert [attrs.row(schema, both.attributes, r) for r in range(3)] == [
        {"price": 3.5}, {"price": 1.0, "colour": "Red"}, {}]


def test_a_folder_catalog_reads_a_sidecar_file(tmp_path):
    for cls, (shape, colour) in CLASSES.items():
        for k in range(2):
            path = tmp_path / "shop" / cls / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_product(shape, colour, np.random.default_rng(k), (40, 40)).save(path)
    lines = [{"id": "Shoes/Boots/0.png", "price": 49.9, "name": "Chelsea boot"},
             {"id": "Bags/Totes/1.png", "price": 12, "on_sale": True},
             {"id": "not/in/the/catalog.png", "price": 1}]
    (tmp_path / "attrs.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    cat = Catalog.read(tmp_path / "shop", attributes_file=tmp_path / "attrs.jsonl")
    got = dict(zip(cat.ids, zip(*cat.attributes.values(), strict=True), strict=True))
    assert list(cat.attributes) == ["price", "name", "on_sale"]
    assert got["Shoes/Boots/0.png"] == ("49.9", "Chelsea boot", "")
    assert got["Bags/Totes/1.png"] == ("12", "", "true")
    assert got["Shoes/Sandals/0.png"] == ("", "", "")
    assert attrs.infer_schema(cat.attributes) == {"price": "float", "name": "string",
                                                  "on_sale": "boolean"}
    (tmp_path / "bad.csv").write_text("sku,price\nx,1\n")
    with pytest.raises(FashionrecError, match="has no id column"):
        Catalog.read(tmp_path / "shop", attributes_file=tmp_path / "bad.csv")


# ------------------------------------------------------------------ CLI
def test_training_records_the_schema_and_results_show_attributes(styles, capsys):
    run, rows, _ = styles
    meta = json.loads((run / "run.json").read_text())
    assert meta["attributes"] == EXPECTED_SCHEMA
    data = recommend_json(capsys, run, "--item", "103", "-k", "3")
    by_id = {r["id"]: r for r in rows}
    for item in data["items"]:
        row = by_id[item["id"]]
        want = {"gender": row["gender"], "baseColour": row["baseColour"],
                "season": row["season"], "year": int(row["year"]), "usage": row["usage"],
                "in_stock": row["in_stock"] == "true", "name": row["name"]}
        if row["price"]:
            want["price"] = float(row["price"])
        assert item["attributes"] == want
    assert data["query"]["attributes"]["name"] == by_id["103"]["name"]
    capsys.readouterr()
    assert main(["recommend", "--run-dir", str(run), "--item", "103", "-k", "3",
                 "--where", "price < 60"]) == 0
    table = capsys.readouterr().out.splitlines()
    cheap = [r for r in rows if r["price"] and float(r["price"]) < 60 and r["id"] != "103"]
    assert table[1] == f"only: price < 60 ({len(cheap)} candidates)"
    assert table[2].split()[-2:] == ["name", "price"]
    for line, item in zip(table[3:6], recommend_json(capsys, run, "--item", "103", "-k",
                                                     "3", "--where", "price < 60")["items"],
                          strict=True):
        assert line.split()[1] == item["id"] and item["attributes"]["name"] in line


@pytest.mark.parametrize("where,expect", [
    ('gender == "Women" and price < 50', dict(gender="Women", max_price=50)),
    ('baseColour in ["Red", "Pink"]', dict(colours=("Red", "Pink"))),
    ('gender == "Men" and price < 80 and baseColour in ["Blue", "Black"]',
     dict(gender="Men", max_price=80, colours=("Blue", "Black"))),
])
def test_where_answers_exactly_k_of_the_matching_products(styles, capsys, where, expect):
    run, rows, _ = styles
    query = "105"
    allowed = {r["id"] for r in rows if matches(r, **expect) and r["id"] != query}
    assert len(allowed) >= 4
    for k in (3, len(allowed)):
        data = recommend_json(capsys, run, "--item", query, "-k", str(k), "--where", where)
        ids = [i["id"] for i in data["items"]]
        assert len(ids) == k and set(ids) <= allowed
        assert data["query"]["n_candidates"] == len(allowed)
    assert set(ids) == allowed  # k = every match: all of them
    # the nearest first, as the unfiltered ranking orders the same products
    every = recommend_json(capsys, run, "--item", query, "-k", str(len(rows) - 1))
    assert ids == [i["id"] for i in every["items"] if i["id"] in allowed]


def test_a_missing_value_matches_only_not_equal(styles, capsys):
    run, rows, _ = styles
    no_price = {r["id"] for r in rows if not r["price"]}
    data = recommend_json(capsys, run, "--item", "100", "-k", "50", "--where",
                          "not (price >= 0)")
    assert {i["id"] for i in data["items"]} == no_price - {"100"}


@pytest.mark.parametrize("where,message", [
    ("colour == \"Red\"", "filter: unknown attribute 'colour' (this catalog has: "),
    ("price < \"cheap\"", "filter: price is a float attribute; \"cheap\" is a string"),
    ("in_stock > true", "filter: in_stock is a boolean attribute; compare it with == or"),
    ("price <", "filter:"),
    ("gender == \"Nobody\"", "no other catalog item is in gender == \"Nobody\""),
])
def test_bad_filters_are_one_line_errors(styles, capsys, where, message):
    run, _, _ = styles
    capsys.readouterr()
    assert main(["recommend", "--run-dir", str(run), "--item", "100", "--where", where]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_where_through_the_hnsw_graph_gives_the_same_answer(styles_copy, capsys):
    run, rows, _ = styles_copy
    where = 'gender == "Women" and in_stock == true'
    exact = recommend_json(capsys, run, "--item", "101", "-k", "5", "--where", where)
    assert main(["index", "--run-dir", str(run), "--search", "hnsw", "--no-progress"]) == 0
    graph = recommend_json(capsys, run, "--item", "101", "-k", "5", "--where", where)
    assert [i["id"] for i in graph["items"]] == [i["id"] for i in exact["items"]]
    assert len(graph["items"]) == 5


def test_added_products_carry_attributes_and_keep_them_through_a_retrain(
        styles_copy, tmp_path, capsys):
    run, rows, root = styles_copy
    shape, colour = CLASSES["Bags/Totes"]
    img = tmp_path / "new-tote.png"
    draw_product(shape, colour, np.random.default_rng(9), (48, 48)).save(img)
    # a value that does not fit, or an attribute the catalog lacks: nothing is added
    for bad, message in ((["--attr", "price=cheap"], "attribute price is a float; 'cheap'"),
                         (["--attr", "colour=Red"], "unknown attribute 'colour'"),
                         (["--attr", "price"], "--attr takes key=value")):
        capsys.readouterr()
        assert main(["add", "--run-dir", str(run), "--image", str(img), "--id", "900",
                     "--no-progress", *bad]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert len(Recommender.load(run).index_) == len(rows)
    assert main(["add", "--run-dir", str(run), "--image", str(img), "--id", "900",
                 "--attr", "price=9.99", "--attr", "gender=Women", "--attr",
                 "name=New tote", "--attr", "in_stock=true", "--no-progress"]) == 0
    want = {"price": 9.99, "gender": "Women", "name": "New tote", "in_stock": True}
    found = recommend_json(capsys, run, "--item", "100", "-k", "1", "--where",
                           "price < 10")
    assert [(i["id"], i["attributes"]) for i in found["items"]] == [("900", want)]
    # a retrain on the CSV carries the added product over, attributes and all
    assert main(["train", "--catalog", str(root / "styles.csv"), "--label-column",
                 "articleType", "--image-size", "32", "--weights", "none", "--epochs", "2",
                 "--run-dir", str(run), "--no-progress"]) == 0
    assert Recommender.load(run).item("900").attributes == want
    found = recommend_json(capsys, run, "--item", "100", "-k", "1", "--where",
                           'name == "New tote"')
    assert [i["id"] for i in found["items"]] == ["900"]


def test_attribute_columns_can_be_chosen_or_turned_off(tmp_path):
    make_styles(tmp_path, n_per_class=1)
    cat = Catalog.read(tmp_path / "styles.csv", label_column="articleType",
                       attribute_columns="price,gender")
    assert list(cat.attributes) == ["price", "gender"]
    assert Catalog.read(tmp_path / "styles.csv", label_column="articleType",
                        attribute_columns="none").attributes is None
    with pytest.raises(FashionrecError, match="has no column 'colour' for --attributes"):
        Catalog.read(tmp_path / "styles.csv", label_column="articleType",
                     attribute_columns="colour")
    with pytest.raises(FashionrecError, match="'articleType' is the id, label or image"):
        Catalog.read(tmp_path / "styles.csv", label_column="articleType",
                     attribute_columns="articleType")


# ------------------------------------------------------------------ service
@pytest.fixture
def client(styles, tmp_path):
    from serving import serve_copy

    run, rows, _ = styles
    yield from ((c, rows) for c, _ in serve_copy(run, tmp_path / "served", "k3y"))


def test_the_api_filters_and_shows_attributes(client):
    client, rows = client
    allowed = {r["id"] for r in rows if matches(r, gender="Women", max_price=50)} - {"102"}
    where = 'gender == "Women" and price < 50'
    r = client.get("/api/items/102/similar", params={"k": 4, "where": where})
    assert r.status_code == 200
    items = r.json()["items"]
    assert len(items) == 4 and {i["id"] for i in items} <= allowed
    assert all(i["attributes"]["gender"] == "Women" for i in items)
    page = client.get("/api/items", params={"where": where, "limit": 100}).json()
    assert page["total"] == len(allowed) + 1
    assert {i["id"] for i in page["items"]} == allowed | {"102"}
    assert client.get("/api/stats").json()["attributes"] == EXPECTED_SCHEMA
    from test_filters import BAD  # the bad-filter corpus, every case over HTTP

    for bad, text in (("colour == 1", "unknown attribute 'colour'"),
                      ("price < \"x\"", "price is a float attribute"),
                      ("(price", "filter:"), *[(t, m) for t, m in BAD if t.strip()]):
        for resp in (client.get("/api/items/102/similar", params={"where": bad}),
                     client.get("/api/items", params={"where": bad})):
            assert resp.status_code == 422 and text in resp.json()["error"], (bad, resp.text)


def test_the_photo_route_filters_and_uploads_carry_attributes(client, tmp_path):
    import io

    client, rows = client
    shape, colour = CLASSES["Shoes/Sandals"]
    buf = io.BytesIO()
    draw_product(shape, colour, np.random.default_rng(4), (48, 48)).save(buf, "PNG")
    photo = buf.getvalue()
    where = 'baseColour in ["Red", "Pink"] and in_stock == true'
    r = client.post("/api/similar", files={"image": ("q.png", photo, "image/png")},
                    data={"k": "3", "where": where})
    assert r.status_code == 200
    for item in r.json()["items"]:
        assert item["attributes"]["baseColour"] in ("Red", "Pink")
        assert item["attributes"]["in_stock"] is True
    r = client.post("/api/similar", files={"image": ("q.png", photo, "image/png")},
                    data={"where": "in_stock == 1"})
    assert r.status_code == 422 and "in_stock is a boolean attribute" in r.json()["error"]
    auth = {"Authorization": "Bearer k3y"}
    bad = client.post("/api/items", headers=auth, files=[("images", ("a.png", photo))],
                      data={"ids": "s1", "attributes": json.dumps({"price": "cheap"})})
    assert bad.status_code == 422 and "attribute price is a float" in bad.json()["error"]
    assert client.get("/api/items/s1").status_code == 404
    ok = client.post("/api/items", headers=auth,
                     files=[("images", ("a.png", photo)), ("images", ("b.png", photo))],
                     data={"ids": ["s1", "s2"], "attr.gender": "Women",
                           "attributes": json.dumps([{"price": 5.5, "name": "Flat"},
                                                     {"price": 6, "in_stock": False}])})
    assert ok.status_code == 200, ok.text
    assert client.get("/api/items/s1").json()["attributes"] == {
        "price": 5.5, "name": "Flat", "gender": "Women"}
    assert client.get("/api/items/s2").json()["attributes"] == {
        "price": 6.0, "in_stock": False, "gender": "Women"}
    r = client.get("/api/items/100/similar", params={"k": 2, "where": "price < 7"})
    assert sorted(i["id"] for i in r.json()["items"]) == ["s1", "s2"]
