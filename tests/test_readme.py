"""The library example in README.md runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys, fmnist_dir):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = [b for b in blocks if "Recommender.load" in b]
    assert example, "README.md has no library example"
    monkeypatch.chdir(tmp_path)
    exec(compile(example[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "query: test image 5033" in out
    assert (tmp_path / "runs" / "quick" / "run.json").is_file()
