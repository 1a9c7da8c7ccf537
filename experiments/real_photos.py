"""Retrieval quality on real photos (clothing-dataset-small), one command per experiment:

    python experiments/real_photos.py features --fit pad [--mirror] [--size 224]
    python experiments/real_photos.py fit        # white letterbox vs centre crop vs resize
    python experiments/real_photos.py flip       # mirrored copies at training / query time
    python experiments/real_photos.py size       # 160 / 224 / 288 px
    python experiments/real_photos.py head --mirror   # the head's dropout and epochs
    python experiments/real_photos.py views      # letterbox + crop, each with its mirror
    python experiments/real_photos.py lr         # the head's learning rate and epochs
    python experiments/real_photos.py pooling    # global average vs GeM pooling
    python experiments/real_photos.py data --fit pad+crop --epochs 64 --lr 5e-5
                                                 # 50 / 75 / 100 % of train/

Tuning protocol (every experiment but ``final``): the head trains on ``train/``; the
341 ``validation/`` photos query a corpus of ``train/`` + ``validation/`` (never getting
themselves back); ``test/`` is not looked at. A retrieved photo is relevant when it has
the query's class. Each row is the mean over 3 head seeds (1234, 1235, 1236), next to
the raw backbone features with cosine (the tutorials' method) on the same queries.
The chosen settings are the catalog defaults; ``make demo-real`` trains with them and
reports the 372 ``test/`` photos as queries against the whole catalog, once.

Features are cached under experiments/out/real/ (not committed); results go to
experiments/results/real_<experiment>.{json,md}. The backbone is the offline ImageNet
stand-in (ResNet50 through stage 4) from ../shared/models.
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

HERE = Path(__file__).resolve().parent
CACHE = HERE / "out" / "real"
RESULTS = HERE / "results"
SPLITS = ("train", "validation", "test")
SEEDS = (1234, 1235, 1236)


def dataset_root():
    from fashionrec.config import shared_dirs

    for shared in shared_dirs():
        root = shared / "datasets" / "clothing-dataset-small"
        if root.is_dir():
            return root
    sys.exit("clothing-dataset-small not found in ../shared/datasets")


def photos():
    """``{split: (paths, labels)}`` of the data set, in a fixed order."""
    from fashionrec.catalog import Catalog

    root = dataset_root()
    out = {}
    for split in SPLITS:
        cat = Catalog.from_folder(root / split)
        out[split] = (cat.paths, np.array(cat.labels))
    return out


def features(fit="pad", size=224, mirror=False, progress=True, pooling="avg"):
    """``{split: (N, 1024) float32}`` for one way of preparing the photos (cached)."""
    import h5py

    from fashionrec import FeatureExtractor, build_backbone
    from fashionrec.catalog import ImageFiles

    path = CACHE / f"{'gem-' if pooling == 'gem' else ''}{fit}-{size}{'-mirror' if mirror else ''}.h5"
    data = photos()
    if path.is_file():
        with h5py.File(path, "r") as f:
            if all(s in f and len(f[s]) == len(data[s][0]) for s in SPLITS):
                return {s: f[s][:] for s in SPLITS}
    CACHE.mkdir(parents=True, exist_ok=True)
    model, info = build_backbone("resnet50", "imagenet", size, log=print, pooling=pooling)
    ext = FeatureExtractor(model, info, batch_size=32)
    out, t = {}, time.perf_counter()
    for split in SPLITS:
        out[split] = ext.transform(ImageFiles(data[split][0], size, fit, mirror), progress)
    seconds = time.perf_counter() - t
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        for split in SPLITS:
            f[split] = out[split]
        f.attrs["seconds"] = seconds
        f.attrs["backbone"] = info.describe()
    tmp.replace(path)
    print(f"{path.name}: {sum(len(v) for v in out.values())} photos in {seconds:.0f} s")
    return out


# ------------------------------------------------------------------ scoring
def precision_at_6(corpus, corpus_labels, queries, query_labels, own_rows, k=6):
    """Mean precision@k and mAP@10 of queries against a corpus (Euclidean), each query's
    own corpus row excluded."""
    from fashionrec.evaluate import RetrievalEvaluator
    from fashionrec.index import CatalogIndex

    classes = sorted(set(corpus_labels))
    y = np.array([classes.index(c) for c in corpus_labels])
    yq = np.array([classes.index(c) for c in query_labels])
    index = CatalogIndex(corpus, np.arange(len(corpus)), y, classes, scaler=None)
    result = RetrievalEvaluator(yq, own_rows, name="q")(index, queries)
    return result["overall"]


def run_setting(feats, mirror_feats=None, train_mirror=False, query_mirror=False,
                dropout=0.7, epochs=32, seeds=SEEDS, query_split="validation",
                corpus_splits=("train", "validation"), train_splits=("train",), views=None,
                train_labels=None, learning_rate=4e-4):
    """Train the head on ``train_splits``, index ``corpus_splits``, query with
    ``query_split``; mean metrics over ``seeds``, plus the raw-feature cosine baseline
    (on ``feats``). ``views`` (a list of feature dicts, e.g. letterboxed, mirrored,
    cropped) replaces the mirror options: the head trains on every view, embeddings
    and class probabilities are the mean over the views."""
    from sklearn.preprocessing import StandardScaler

    from fashionrec import ClassifierHead

    if views is None:
        views = [feats] + ([mirror_feats] if query_mirror else [])
        train_views = [feats] + ([mirror_feats] if train_mirror else [])
    else:
        train_views = views
    data = photos()
    labels = {s: data[s][1] for s in SPLITS}
    classes = sorted(set(labels["train"]))
    enc = lambda lab: np.array([classes.index(c) for c in lab])  # noqa: E731
    x_tr = np.concatenate([v[s] for v in train_views for s in train_splits])
    if train_labels is None:
        train_labels = np.concatenate([labels[s] for s in train_splits])
    y_tr = np.concatenate([enc(train_labels)] * len(train_views))
    corpus = [np.concatenate([v[s] for s in corpus_splits]) for v in views]
    corpus_y = np.concatenate([labels[s] for s in corpus_splits])
    start = sum(len(feats[s]) for s in corpus_splits[:corpus_splits.index(query_split)])
    own = np.arange(start, start + len(feats[query_split]))
    q_labels = labels[query_split]
    rows = []
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(y_tr))
        head = ClassifierHead(len(classes), epochs=epochs, dropout=dropout,
                              learning_rate=learning_rate, validation_split=0.0, seed=seed,
                              verbose=0)
        head.fit(x_tr[order], y_tr[order])
        emb = np.mean([head.embed(c) for c in corpus], axis=0)
        z = StandardScaler().fit(emb).transform(emb)
        m = precision_at_6(z, corpus_y, z[own], q_labels, own)
        proba = np.mean([head.predict_proba(v[query_split]) for v in views], axis=0)
        m["head_accuracy"] = float((proba.argmax(1) == enc(q_labels)).mean())
        rows.append(m)
    keys = ("precision@1", "precision@6", "precision@10", "map@10", "head_accuracy")
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out.update({f"{k}_std": float(np.std([r[k] for r in rows])) for k in keys})
    raw = corpus[0] / np.linalg.norm(corpus[0], axis=1, keepdims=True)  # cosine ranking
    base = precision_at_6(raw, corpus_y, raw[own], q_labels, own)
    out["raw_cosine_precision@6"] = base["precision@6"]
    out["raw_cosine_map@10"] = base["map@10"]
    return out


def write(name, rows, notes):
    from fashionrec.artifacts import cpu_description

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"experiment": name, "cpu": cpu_description(), "protocol": notes, "rows": rows}
    (RESULTS / f"real_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    cols = ("precision@1", "precision@6", "map@10", "head_accuracy", "raw_cosine_precision@6")
    lines = [f"# real photos: {name}", "", notes, "",
             "| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for setting, r in rows.items():
        cells = [f"{r[c]:.4f}" + (f" ± {r[c + '_std']:.3f}" if c + "_std" in r else "")
                 for c in cols]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    (RESULTS / f"real_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


TUNING = ("head trained on train/ (3 seeds, mean ± std); queries: the 341 validation/ "
          "photos against train/ + validation/; 224 px unless the row says otherwise")


def exp_fit(args):
    rows = {}
    for fit in ("pad", "crop", "resize"):
        rows[fit] = run_setting(features(fit, args.size))
    write("fit", rows, TUNING)


def exp_flip(args):
    f, m = features(args.fit, args.size), features(args.fit, args.size, mirror=True)
    rows = {"no mirror": run_setting(f),
            "mirror at training": run_setting(f, m, train_mirror=True),
            "mirror at query/index": run_setting(f, m, query_mirror=True),
            "mirror at both": run_setting(f, m, train_mirror=True, query_mirror=True)}
    write("flip", rows, TUNING + f"; fit {args.fit}")


def exp_size(args):
    rows = {}
    for size in (160, 224, 288):
        rows[f"{size} px"] = run_setting(features(args.fit, size))
    write("size", rows, TUNING + f"; fit {args.fit}")


def exp_head(args):
    f = features(args.fit, args.size)
    m = features(args.fit, args.size, mirror=True) if args.mirror else None
    rows = {}
    for dropout in (0.5, 0.7):
        for epochs in (16, 32, 64):
            rows[f"dropout {dropout}, {epochs} epochs"] = run_setting(
                f, m, train_mirror=args.mirror, query_mirror=args.mirror, dropout=dropout,
                epochs=epochs)
    write("head", rows, TUNING + f"; fit {args.fit}; mirror {args.mirror}")


def exp_views(args):
    pad, pad_m = features("pad", args.size), features("pad", args.size, mirror=True)
    crop, crop_m = features("crop", args.size), features("crop", args.size, mirror=True)
    rows = {}
    for epochs in (32, 64):
        for name, views in (("pad + mirror", [pad, pad_m]),
                            ("pad + mirror + crop + mirror", [pad, pad_m, crop, crop_m])):
            rows[f"{name}, {epochs} epochs"] = run_setting(pad, views=views, epochs=epochs)
    write("views", rows, TUNING + "; the head trains on every view, embeddings and class "
                                  "probabilities are the mean over the views")


def exp_lr(args):
    """The head's learning rate and epochs, on the four views (pad, crop, mirrored)."""
    views = [features(fit, args.size, mirror=m) for fit in ("pad", "crop") for m in (False, True)]
    rows = {}
    for lr, epochs in ((4e-4, 32), (5e-5, 64)):  # the recipe's, the catalog default
        rows[f"lr {lr:g}, {epochs} epochs"] = run_setting(views[0], views=views, epochs=epochs,
                                                         learning_rate=lr)
    write("lr", rows, TUNING + "; views: pad, crop, each with its mirror; dropout 0.7")


def exp_pooling(args):
    """Global average vs generalized-mean (GeM, p=3) pooling of the stage-4 feature map,
    one letterboxed view, the recipe's head."""
    rows = {p: run_setting(features(args.fit, args.size, pooling=p)) for p in ("avg", "gem")}
    write("pooling", rows, TUNING + f"; fit {args.fit}; one view; the recipe's head")


def exp_data(args):
    """Does more training data help? The head trains on a stratified share of train/
    (the catalog defaults otherwise): if it keeps rising at 100 %, adding validation/'s
    341 photos for the final run is worth losing the validation curve."""
    from sklearn.model_selection import train_test_split

    views = [features(fit, args.size, mirror=m) for fit in args.fit.split("+")
             for m in (False, True)]
    labels = photos()["train"][1]
    rows = {}
    for share in (0.5, 0.75, 1.0):
        keep = (np.arange(len(labels)) if share == 1.0 else np.sort(train_test_split(
            np.arange(len(labels)), train_size=share, random_state=0, stratify=labels)[0]))
        sub = [{**v, "train_sub": v["train"][keep]} for v in views]
        rows[f"{share:.0%} of train/ ({len(keep)} photos)"] = run_setting(
            sub[0], views=sub, epochs=args.epochs, train_splits=("train_sub",),
            train_labels=labels[keep], learning_rate=args.lr)
    write("data", rows, TUNING + f"; views: {args.fit}, each with its mirror; "
                                 f"{args.epochs} epochs, learning rate {args.lr:g}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=("features", "fit", "flip", "size", "head", "views",
                                              "lr", "pooling", "data"))
    p.add_argument("--fit", default="pad")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mirror", action="store_true")
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    args = p.parse_args()
    if args.experiment == "features":
        features(args.fit, args.size, args.mirror)
        return
    {"fit": exp_fit, "flip": exp_flip, "size": exp_size, "head": exp_head,
     "views": exp_views, "lr": exp_lr, "pooling": exp_pooling,
     "data": exp_data}[args.experiment](args)


if __name__ == "__main__":
    main()
