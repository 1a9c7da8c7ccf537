import json
import os
import subprocess
import sys

import h5py
import pytest

import fashionrec.cli
from fashionrec.cli import main
from fashionrec.rundir import RunDir

TINY_TRAIN = ["--n-train", "40", "--n-reco", "20", "--image-size", "32", "--epochs", "1",
              "--batch-size", "8", "--weights", "none", "--no-progress"]


def test_train_then_recommend_then_plot(tmp_path, fmnist_dir, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--data-dir", str(fmnist_dir), "--n-train", "40", "--n-reco", "20",
               "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--weights", "none",
               "--run-dir", str(run), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("run.json", "head.keras", "index.h5", "curves.png"):
        assert name in out
    assert (run / "plots" / "curves.png").stat().st_size > 0

    assert main(["recommend", "--run-dir", str(run), "--idx", "5033"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("query: test image 5033 (true: ")
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 6
    assert (run / "plots" / "recommend-idx5033.png").is_file()

    assert main(["recommend", "--run-dir", str(run), "--idx", "3", "--k", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["items"]) == 4 and data["query"]["test_index"] == 3
    assert 3 not in [i["id"] for i in data["items"]]
    assert set(data["items"][0]) == {"rank", "id", "label", "class_name", "distance"}

    out_png = tmp_path / "c.png"
    assert main(["plot", "--run-dir", str(run), "--out", str(out_png)]) == 0
    assert out_png.read_bytes()[:4] == b"\x89PNG"

    # user errors: one line on stderr, non-zero exit
    assert main(["recommend", "--run-dir", str(run), "--idx", "10000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: test index 10000 is out of range") and err.count("\n") == 1

    (run / "junk.png").write_text("junk")
    assert main(["recommend", "--run-dir", str(run), "--image", str(run / "junk.png")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read image")

    with h5py.File(RunDir(run).current().index, "w") as f:  # foreign HDF5 as the index
        f["x"] = [1]
    assert main(["recommend", "--run-dir", str(run), "--idx", "1"]) == 1
    assert "not a fashionrec index" in capsys.readouterr().err


def test_no_run_yet(tmp_path, capsys):
    assert main(["recommend", "--run-dir", str(tmp_path), "--idx", "1"]) == 1
    assert "run `make train` first" in capsys.readouterr().err
    assert main(["plot", "--run-dir", str(tmp_path)]) == 1
    assert "run `make train` first" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "must be >= 1"),
    (["train", "--image-size", "16", "--weights", "none"], "image_size must be an integer >= 32"),
    (["train", "--dataset", "cifar"], "invalid choice"),
    (["train", "--weights", "missing.h5"], "weights must be"),
    (["train", "--backbone", "missing.keras"], "does not exist"),
    (["recommend", "--idx", "x"], "invalid int value"),
])
def test_bad_options_are_one_line(argv, message, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc != 0 and message in err and err.count("\n") == 1


def test_console_script_errors_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fashionrec", "recommend", "--run-dir",
                           str(tmp_path), "--idx", "1"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no trained run")


def test_training_is_reproducible_across_processes(tmp_path, fmnist_dir):
    """Same seed, same data, two fresh processes: the same catalog vectors."""
    import numpy as np

    vectors, outputs = [], []
    for name in ("a", "b"):
        run = tmp_path / name
        outputs.append(subprocess.run(
            [sys.executable, "-m", "fashionrec", "train", "--data-dir",
             str(fmnist_dir), "--n-train", "40", "--n-reco", "20", "--image-size",
             "32", "--epochs", "2", "--batch-size", "8", "--weights", "none",
             "--run-dir", str(run), "--no-progress"], check=True, capture_output=True,
            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": ""}))
        with h5py.File(RunDir(run).current().index) as f:
            vectors.append(f["vectors"][:])
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5, atol=1e-5)
    # quiet by default: what a user needs, the engine said on the first lines
    out = outputs[0]
    first = out.stdout.splitlines()[:4]
    assert any(line.startswith("engine: ") for line in first), out.stdout
    for noise in ("WARNING", "I0000", "E0000", "cuInit", "oneDNN", "retracing",
                  "Downloading data"):
        assert noise not in out.stdout + out.stderr, noise


def test_train_refuses_a_folder_that_holds_no_run(tmp_path, fmnist_dir, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    argv = ["train", "--data-dir", str(fmnist_dir), *TINY_TRAIN, "--run-dir", str(folder)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(folder) in err
    assert "--force" in err
    # refused before training: nothing written, nothing deleted
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]

    assert main([*argv, "--force"]) == 0
    out = capsys.readouterr().out
    run = RunDir(folder)
    assert run.exists() and run.current().index.is_file()
    assert f"run:            {run.run_file} (metadata)" in out
    assert f"index:          {run.current().index} (exact search)" in out


def test_help_from_the_module_the_entry_point_and_main(capsys):
    proc = subprocess.run([sys.executable, "-m", "fashionrec", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fashionrec")
    for verb in ("train", "extract", "recommend", "add", "remove", "compact", "index",
                 "evaluate", "plot", "serve"):
        assert verb in proc.stdout
    script = os.path.join(os.path.dirname(sys.executable), "fashionrec")
    if os.path.isfile(script):  # the console entry point fashionrec.cli:main
        proc = subprocess.run([script, "train", "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "--force" in proc.stdout

    with pytest.raises(SystemExit) as exc:
        fashionrec.cli.main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fashionrec")
    assert set(fashionrec.cli.COMMANDS) == {"train", "extract", "recommend", "add", "remove",
                                            "compact", "index", "evaluate", "plot", "serve"}


def test_interrupt_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(fashionrec.cli.COMMANDS, "plot", interrupted)
    assert main(["plot", "--run-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err == (
        "error: interrupted; the run's published version is unchanged\n")
