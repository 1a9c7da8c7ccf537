"""The library examples in README.md run as written."""

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _example(marker):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert found, f"README.md has no library example with {marker}"
    return found[0]


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys, fmnist_dir):
    monkeypatch.chdir(tmp_path)
    exec(compile(_example("Recommender.load"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "query: test image 5033" in out
    assert (tmp_path / "runs" / "quick" / "run.json").is_file()


def test_readme_catalog_example_runs(tmp_path, monkeypatch, capsys, fmnist_dir):
    monkeypatch.chdir(tmp_path)
    exec(compile(_example("format_report(rec.report_)"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "catalog: 120 of 125 items usable, 5 skipped, 10 classes" in out
    assert "query: catalog item Footwear/Boots/acme/boots-0000.jpg" in out
    assert "only: category Footwear" in out
    assert "139 products in the living index" in out
    from fashionrec import RunDir

    assert RunDir(tmp_path / "runs" / "shop").current().index_manifest.is_file()


def test_readme_attributes_example_runs(tmp_path, monkeypatch, capsys, fmnist_dir):
    monkeypatch.chdir(tmp_path)
    exec(compile(_example("where="), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    schema = ast.literal_eval(out[0])  # the printed dict
    assert schema["price"] == "float" and schema["in_stock"] == "boolean"
    assert schema["year"] == "integer" and schema["gender"] == "string"
    assert out[2] == 'only: gender == "Women" and price < 60 (' + out[2].split("(")[1]
    assert out[3].split()[-3:] == ["productDisplayName", "gender", "price"]
    assert all(" Women " in line for line in out[4:7]) and len(out) == 7
