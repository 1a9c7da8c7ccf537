"""Retrieval-quality experiments on Fashion-MNIST, one command each:

    python experiments/quality.py methods      # raw pixels / raw features (cosine, Euclidean,
                                               # standardized) / the head's mid-layer (seed)
    python experiments/quality.py image_size   # 32, 64, 112, 224 px
    python experiments/quality.py backbone     # stage-4 ImageNet vs random weights vs full ResNet50
    python experiments/quality.py train_size   # head trained on 5k, 15k (seed), 60k images
    python experiments/quality.py all

Protocol (the same for every row): the catalog is the first 5,000 test images; the
queries are the other 5,000 test images (held out: never in the catalog, never seen in
training) and, separately, every catalog item against the rest (leave-one-out). A
retrieved item is relevant when it has the query's class. The head follows the seed
recipe (32 epochs, batch 64, Adam 4e-4, dropout 0.7, balanced class weights, seed 1234).
Results: experiments/results/<experiment>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from features import RESULTS, get_features  # noqa: E402

N_RECO = 5000
STANDIN = "resnet50"  # resolves to the ImageNet stand-in offline, to ResNet50 where online
HEADLINE = ("precision@1", "precision@6", "precision@10", "recall@10", "map@10", "1nn_accuracy")


def score(catalog, queries, y_test, class_names):
    """Held-out and leave-one-out retrieval metrics for vectors already in their space."""
    from fashionrec import CatalogIndex
    from fashionrec.evaluate import evaluate_vectors

    y_cat, y_q = y_test[:N_RECO], y_test[N_RECO:]
    index = CatalogIndex(catalog, np.arange(N_RECO), y_cat, class_names, scaler=None)
    return {"heldout": evaluate_vectors(index, queries, y_q),
            "catalog_loo": evaluate_vectors(index, catalog, y_cat, np.arange(N_RECO))}


def head_space(f_train, y_train, f_test, y_test, epochs=32):
    """The seed recipe: train the head, embed with dense_mid, re-standardize on the catalog."""
    from sklearn.preprocessing import StandardScaler

    from fashionrec import ClassifierHead

    t = time.perf_counter()
    head = ClassifierHead(n_classes=10, epochs=epochs, verbose=0).fit(f_train, y_train)
    emb = head.embed(f_test)
    scaler = StandardScaler().fit(emb[:N_RECO])
    z = scaler.transform(emb)
    acc = float(np.mean(head.predict(f_test[N_RECO:]) == y_test[N_RECO:]))
    return z[:N_RECO], z[N_RECO:], {"head_heldout_accuracy": acc,
                                    "head_train_seconds": time.perf_counter() - t}


def raw_spaces(f_train, f_test):
    from sklearn.preprocessing import StandardScaler

    unit = f_test / np.linalg.norm(f_test, axis=1, keepdims=True).clip(1e-12)
    std = StandardScaler().fit(f_train).transform(f_test)
    return {"raw features, cosine": unit, "raw features, Euclidean": f_test,
            "raw features standardized, Euclidean": std}


def row(name, res, extra=None):
    r = {"method": name, **{k: res["heldout"]["overall"][k] for k in HEADLINE},
         "loo_map@10": res["catalog_loo"]["overall"]["map@10"]}
    r.update(extra or {})
    return r


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) and c != "img/s" else
                         (f"{v:.1f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write(name, title, rows, columns, notes, per_class=None):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "per_class": per_class},
                                                     indent=2) + "\n")
    lines = [f"# {title}", "", *notes, "", *table(rows, columns)]
    if per_class:
        methods = list(per_class)
        lines += ["", "Held-out precision@6 per class:", "",
                  "| class | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for cls in per_class[methods[0]]:
            lines.append(f"| {cls} | " + " | ".join(
                f"{per_class[m][cls]['precision@6']:.4f}" for m in methods) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


COLUMNS = ["method", "precision@1", "precision@6", "precision@10", "recall@10", "map@10",
           "1nn_accuracy", "loo_map@10"]
PROTOCOL = ("Catalog: first 5,000 test images. Queries: the other 5,000 test images "
            "(held out); `loo_map@10`: every catalog item against the rest.")


def exp_methods(ds, size=224, n_train=15000):
    f_train, f_test, info, _ = get_features(size, STANDIN, "imagenet", 60000)
    f_train, y_tr = f_train[:n_train], ds.y_train[:n_train]
    rows, per_class = [], {}
    pixels = ds.x_test.reshape(len(ds.x_test), -1).astype(np.float32) / 255
    res = score(pixels[:N_RECO], pixels[N_RECO:], ds.y_test, ds.class_names)
    rows.append(row("raw pixels, Euclidean (floor)", res))
    per_class["pixels"] = res["heldout"]["per_class"]
    for name, space in raw_spaces(f_train, f_test).items():
        res = score(space[:N_RECO], space[N_RECO:], ds.y_test, ds.class_names)
        rows.append(row(name, res))
        if "cosine" in name:
            per_class["raw cosine"] = res["heldout"]["per_class"]
        if "standardized" in name:
            per_class["raw std. Euclidean"] = res["heldout"]["per_class"]
    cat, q, extra = head_space(f_train, y_tr, f_test, ds.y_test)
    res = score(cat, q, ds.y_test, ds.class_names)
    rows.append(row("head dense_mid, re-standardized, Euclidean (seed)", res, extra))
    per_class["head (seed)"] = res["heldout"]["per_class"]
    write("methods", "Does the head help? Raw features vs the head's mid-layer", rows, COLUMNS,
          [f"Backbone: {info.describe()}. Head trained on the first {n_train:,} training "
           f"images. {PROTOCOL}"], per_class)


def exp_image_size(ds, sizes=(32, 64, 112, 224), n_train=15000):
    bench = RESULTS / "bench_extract.json"
    speed = {}
    if bench.is_file():
        speed = {r["image_size"]: r["batched"]["images_per_s"]
                 for r in json.loads(bench.read_text())["speed"]}
    rows = []
    for size in sizes:
        n_all = 60000 if size == 224 else n_train
        f_train, f_test, info, _ = get_features(size, STANDIN, "imagenet", n_all)
        cat, q, extra = head_space(f_train[:n_train], ds.y_train[:n_train], f_test, ds.y_test)
        extra["img/s"] = speed.get(size, float("nan"))
        rows.append(row(f"{size} px", score(cat, q, ds.y_test, ds.class_names), extra))
    write("image_size", "Image size: quality and extraction speed", rows,
          COLUMNS + ["head_heldout_accuracy", "img/s"],
          [f"Backbone: {info.describe().rsplit(' at ', 1)[0]}. Head on {n_train:,} training "
           f"images (seed recipe). {PROTOCOL} `img/s`: batched extraction from "
           "`bench_extract.json` (same machine, 2 cores)."])


def random_standin(path):
    """The stage-4 architecture of the stand-in with freshly initialized (random) weights."""
    import keras

    from fashionrec.extract import find_standin

    if not path.is_file():
        src = keras.saving.load_model(find_standin(), compile=False)
        keras.utils.set_random_seed(1234)
        clone = keras.models.clone_model(src)  # same layers, new random initialization
        path.parent.mkdir(parents=True, exist_ok=True)
        clone.save(path)
    return str(path)


def exp_backbone(ds, size=112, n_train=15000):
    rows = []
    configs = [
        ("stage-4 ResNet50, ImageNet weights (1024-d)", STANDIN, "imagenet"),
        ("stage-4 ResNet50, random weights (1024-d)",
         random_standin(Path(__file__).resolve().parent / "out" / "standin_random.keras"),
         "imagenet"),
        ("full ResNet50, random weights (2048-d)", "resnet50", "none"),
    ]
    for name, backbone, weights in configs:
        f_train, f_test, info, _ = get_features(size, backbone, weights, n_train)
        cat, q, extra = head_space(f_train, ds.y_train[:n_train], f_test, ds.y_test)
        rows.append(row(name, score(cat, q, ds.y_test, ds.class_names), extra))
    rows.append({"method": "full ResNet50, ImageNet weights (2048-d)",
                 **{c: "not measurable here" for c in COLUMNS[1:2]}})
    write("backbone", "Feature layer and backbone weights", rows,
          COLUMNS + ["head_heldout_accuracy"],
          [f"At {size} px (every backbone at the same size), head on {n_train:,} training "
           f"images. {PROTOCOL}",
           "",
           "The full ResNet50 with ImageNet weights cannot be measured on these machines: the "
           "official weights file cannot be downloaded, and of the original Caffe weights "
           "nine stage-5 convolution kernels are missing (see ../shared/models/README.md)."])


def exp_train_size(ds, size=224, sizes=(5000, 15000, 60000)):
    f_train, f_test, info, _ = get_features(size, STANDIN, "imagenet", 60000)
    rows = []
    for n in sizes:
        cat, q, extra = head_space(f_train[:n], ds.y_train[:n], f_test, ds.y_test)
        rows.append(row(f"{n:,} training images", score(cat, q, ds.y_test, ds.class_names), extra))
    write("train_size", "Training-set size of the head", rows,
          COLUMNS + ["head_heldout_accuracy", "head_train_seconds"],
          [f"Backbone: {info.describe()}. {PROTOCOL}"])


EXPERIMENTS = {"methods": exp_methods, "image_size": exp_image_size,
               "backbone": exp_backbone, "train_size": exp_train_size}


def main():
    from fashionrec import load_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    args = p.parse_args()
    ds = load_dataset("fashion_mnist")
    for name in EXPERIMENTS if args.experiment == "all" else [args.experiment]:
        EXPERIMENTS[name](ds)


if __name__ == "__main__":
    main()
