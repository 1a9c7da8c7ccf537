"""Better neighbours from the same features: every method of issue 19, alone and
combined, on validation data of three catalogs, then the chosen settings on held-out
data once.

    python experiments/quality_methods.py features     # extract and cache what the sets need
    python experiments/quality_methods.py validate     # every method on validation data
    python experiments/quality_methods.py final        # the chosen settings on held-out data
                                                       # (run once, after validate)

Methods (each an option of the library; the design card's recipe is the baseline):
- ``loss``: a metric-learning loss on the head's ``dense_mid`` beside the softmax
  (:mod:`fashionrec.metric`: multi-similarity or supervised contrastive, with a weight);
- ``qe``: alpha query expansion at query time (:mod:`fashionrec.expansion`, through
  :meth:`CatalogIndex.search_rows`, the path the CLI, the service and evaluate take);
- ``dba``: database-side augmentation of the catalog's vectors.

Sets (the features come from the stand-in ResNet50 stage 4, 224 px, OpenVINO bfloat16
where the CPU has it, as ``make train`` and ``make demo-real`` run):
- ``fmnist``: the recipe (head on the first 15,000 training images, 32 epochs, Adam
  4e-4). Validation: a catalog of training images 15,000-19,999 and queries 20,000-24,999
  (never seen by the head). Held out (final only): the first 5,000 test images as the
  catalog, the next 5,000 as queries, as ``fashionrec evaluate`` scores a run.
- ``real``: clothing-dataset-small with the catalog defaults (letterbox + centre crop,
  each mirrored, GeM pooling, 64 epochs, Adam 5e-5). Validation: the head trains on
  ``train/``; the ``validation/`` photos query ``train/`` + ``validation/`` (never getting
  themselves back). Held out (final only): the head trains on ``train/`` + ``validation/``
  (``make demo-real``'s setting) and the ``test/`` photos query the whole catalog.
- ``real-ft``, ``proxy-ft``: the same with features from the backbone fine-tuned
  (``--fine-tune-blocks 1 --fine-tune-epochs 1``, :mod:`fashionrec.finetune`) on the
  head's training photos and their 10 classes (the proxy's sub-classes are not used to
  tune it); the tuning time is counted in the extraction time. Fashion-MNIST has no
  such row: the library fine-tunes product-catalog runs only.
- ``proxy``: a fine-grained proxy made from the same photos: each class split by the
  photo's dominant colour (7 bins: 5 hue sectors, dark, light), sub-classes with fewer
  than 5 training photos dropped. Same protocol as ``real`` with the sub-classes as
  labels. It is a stand-in for a shop with many small classes, not such a shop.

Each row is the mean over seeds (1234, 1235 by default); it gives the time the
extraction of its features took (cached: measured once) and the head's training time.
Results: experiments/results/quality_methods.{json,md} and quality_methods_final.*.
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
ROOT = HERE.parent
CACHE = HERE / "out" / "methods"
RESULTS = HERE / "results"
SEEDS = (1234, 1235)
FINE_TUNE = (1, 1)  # blocks, epochs: --fine-tune-blocks 1 --fine-tune-epochs 1
REAL_VIEWS = (("pad", False), ("pad", True), ("crop", False), ("crop", True))

# name -> (metric loss setting, query expansion, database-side augmentation)
LOSSES = {
    "softmax (recipe)": None,
    "+ multi-similarity 0.5": {"name": "multi_similarity", "weight": 0.5},
    "+ supcon 0.5": {"name": "supcon", "weight": 0.5},
    "+ multi-similarity 1": {"name": "multi_similarity", "weight": 1.0},
    "+ multi-similarity 2": {"name": "multi_similarity", "weight": 2.0},
    "+ supcon 1": {"name": "supcon", "weight": 1.0},
}
EXPANSIONS = {
    "": (None, None),
    ", QE k=2": ({"k": 2, "alpha": 3.0}, None),
    ", QE k=5": ({"k": 5, "alpha": 3.0}, None),
    ", DBA k=2": (None, {"k": 2, "alpha": 3.0}),
    ", DBA k=5": (None, {"k": 5, "alpha": 3.0}),
    ", DBA k=2 + QE k=2": ({"k": 2, "alpha": 3.0}, {"k": 2, "alpha": 3.0}),
    ", DBA k=5 + QE k=5": ({"k": 5, "alpha": 3.0}, {"k": 5, "alpha": 3.0}),
    ", DBA k=10": (None, {"k": 10, "alpha": 3.0}),
}


# ------------------------------------------------------------------ features
def _backbone(pooling, path="resnet50"):
    from fashionrec import build_backbone

    return build_backbone(path, "imagenet", 224, log=None, pooling=pooling,
                          engine="auto", precision="auto")


def tuned_backbone(train_on):
    """``(path, record)`` of the backbone fine-tuned as ``fashionrec train --catalog
    clothing-dataset-small --fine-tune-blocks 1 --fine-tune-epochs 1 --train-on
    TRAIN_ON`` tunes it (the library's own code, the same split rule), kept in CACHE."""
    from fashionrec.catalog import Catalog
    from fashionrec.config import RunConfig
    from fashionrec.training import _fine_tune

    catalog = Catalog.from_folder(ROOT.parent / "shared" / "datasets" /
                                  "clothing-dataset-small")
    cfg = RunConfig(fine_tune_blocks=FINE_TUNE[0], fine_tune_epochs=FINE_TUNE[1],
                    train_on=train_on).resolved(catalog=True)
    return _fine_tune(cfg, catalog, 5, None, CACHE, True, print)


def _cached(name, make):
    """``{key: array}`` from ``CACHE/name.h5``, else made by ``make()`` (which returns
    the arrays) and written, with the seconds it took."""
    import h5py

    path = CACHE / f"{name}.h5"
    if path.is_file():
        with h5py.File(path, "r") as f:
            return {k: f[k][:] for k in f}, float(f.attrs["seconds"])
    CACHE.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    arrays = make()
    seconds = time.perf_counter() - t
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        for k, v in arrays.items():
            f[k] = v
        f.attrs["seconds"] = seconds
    tmp.replace(path)
    return arrays, seconds


def fmnist_features():
    """``({part: features}, {part: labels}, seconds)``; the head's training images come
    from the default run's feature cache when it is there (same backbone, same key)."""
    from fashionrec import FeatureExtractor
    from fashionrec.data import load_dataset
    from fashionrec.extract import cached_features

    ds = load_dataset("fashion_mnist")
    parts = {"train": (ds.x_train, ds.y_train, 0, 15000),
             "val_catalog": (ds.x_train, ds.y_train, 15000, 20000),
             "val_queries": (ds.x_train, ds.y_train, 20000, 25000),
             "catalog": (ds.x_test, ds.y_test, 0, 5000),
             "heldout": (ds.x_test, ds.y_test, 5000, 10000)}
    model, info = _backbone("avg")
    ext = FeatureExtractor(model, info, 32)
    feats, labels, seconds = {}, {}, 0.0
    for name, (x, y, a, b) in parts.items():
        t = time.perf_counter()
        # the default run's cache names: "train" and "catalog" are its very images
        feats[name] = cached_features(ext, x[a:b], ROOT / "runs" / "default" / "features",
                                      name, progress=True)
        seconds += time.perf_counter() - t
        labels[name] = y[a:b]
    run = ROOT / "runs" / "default" / "run.json"
    if run.is_file():  # the default run's extraction of its 20,000 images: the real cost
        seconds = json.loads(run.read_text())["timings"]["extract_s"]
    return feats, labels, seconds


def real_photos():
    sys.path.insert(0, str(HERE))
    from real_photos import photos

    return photos()


def real_features(tuned_on=None):
    """``({view: {split: features}}, seconds)`` for the catalog defaults' four views;
    ``tuned_on``: from the backbone fine-tuned on those splits (``"train"`` or
    ``"train+validation"``), its tuning time counted in the seconds."""
    from fashionrec import FeatureExtractor
    from fashionrec.images import ImageFiles

    data = real_photos()
    path, tag, seconds = "resnet50", "", 0.0
    if tuned_on:
        path, record = tuned_backbone(tuned_on)
        tag, seconds = f"-tuned-{Path(path).stem[-16:]}", record["total_s"]
    out = {}
    for fit, mirror in REAL_VIEWS:
        def make(fit=fit, mirror=mirror):
            model, info = _backbone("gem", str(path))
            ext = FeatureExtractor(model, info, 32)
            return {s: ext.transform(ImageFiles(data[s][0], 224, fit, mirror), True)
                    for s in data}
        arrays, s = _cached(f"real-gem-{fit}{'-mirror' if mirror else ''}-224{tag}", make)
        out[(fit, mirror)], seconds = arrays, seconds + s
    return out, seconds


HUE_SECTORS = 5


def colour_bin(path):
    """The dominant colour of a photo's centre: ``dark``, ``light`` or one of
    :data:`HUE_SECTORS` hue sectors, from the mean of its saturated pixels."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((64, 64))
    hsv = np.asarray(im.convert("HSV"), dtype=np.float32)[16:48, 16:48].reshape(-1, 3)
    sat = hsv[:, 1] > 60
    if sat.mean() < 0.25:
        return "dark" if hsv[:, 2].mean() < 110 else "light"
    hue = hsv[sat, 0] / 255.0 * 2 * np.pi  # circular mean of the saturated pixels' hue
    angle = np.arctan2(np.sin(hue).mean(), np.cos(hue).mean()) % (2 * np.pi)
    return f"hue{int(angle / (2 * np.pi) * HUE_SECTORS) % HUE_SECTORS}"


def proxy_labels():
    """``{split: sub-class labels}``: class/colour, with rare sub-classes (< 5 training
    photos) marked ``None`` (dropped)."""
    data = real_photos()

    def make():
        return {s: np.array([colour_bin(p) for p in data[s][0]], dtype="S8") for s in data}
    colours, _ = _cached("proxy-colours", make)
    labels = {s: np.array([f"{c}/{b.decode()}" for c, b in zip(data[s][1], colours[s],
                                                              strict=True)]) for s in data}
    names, counts = np.unique(labels["train"], return_counts=True)
    keep = set(names[counts >= 5])
    return {s: np.array([lab if lab in keep else None for lab in v], dtype=object)
            for s, v in labels.items()}


# ------------------------------------------------------------------ one evaluation
def head_and_vectors(d, head_args, seed, heads):
    """The head trained on a set's training views (cached in ``heads`` by setting and
    seed), the corpus's ``(probs, vectors)`` and the queries' ``(probs, vectors)``
    (``None`` when the queries are corpus rows): the library's Embedder does both."""
    from fashionrec import ClassifierHead
    from fashionrec.embedder import Embedder

    key = (json.dumps(head_args, sort_keys=True), seed)
    if key not in heads:
        x = np.concatenate(d["train_views"])
        y = np.concatenate([d["y_train"]] * len(d["train_views"]))
        order = np.random.default_rng(seed).permutation(len(y))
        t = time.perf_counter()
        head = ClassifierHead(d["n_classes"], seed=seed, verbose=0, **head_args).fit(
            x[order], y[order])
        fit_s = time.perf_counter() - t
        embedder, probs, vectors = Embedder.fit(None, head, d["corpus_views"])
        queries = (embedder.encode_features(d["query_views"])
                   if d["query_views"] is not None else None)
        heads[key] = (probs, vectors, queries, fit_s)
    return heads[key]


def score(d, head_args, qe, dba, seed, heads):
    """precision@6, map@10 and head accuracy of one setting, as the library answers:
    DBA on the stored vectors, QE inside ``CatalogIndex.search_rows``."""
    from fashionrec.evaluate import RetrievalEvaluator
    from fashionrec.expansion import augment_catalog
    from fashionrec.index import CatalogIndex

    probs, vectors, queries, fit_s = head_and_vectors(d, head_args, seed, heads)
    names = [str(c) for c in range(d["n_classes"])]
    index = CatalogIndex(vectors, np.arange(len(vectors)), d["corpus_y"], names)
    if dba:
        index = CatalogIndex(augment_catalog(vectors, index.backend, dba),
                             index.ids, d["corpus_y"], names)
    index.query_expansion = qe
    rows = d["query_rows"]
    if queries is None:  # the queries are catalog products: their stored vectors
        q_probs, q_vectors, q_y = probs[rows], index.vectors[rows], d["corpus_y"][rows]
    else:
        (q_probs, q_vectors), q_y = queries, d["query_y"]
    result = RetrievalEvaluator(q_y, rows, name="q")(index, q_vectors)["overall"]
    return {"precision@6": result["precision@6"], "map@10": result["map@10"],
            "head_accuracy": float((q_probs.argmax(1) == q_y).mean()), "fit_s": fit_s}


def set_data(name, final):
    """What one set's protocol needs (see the module doc), validation or held out."""
    if name == "fmnist":
        f, y, seconds = fmnist_features()
        cat, q = ("catalog", "heldout") if final else ("val_catalog", "val_queries")
        return {"train_views": [f["train"]], "y_train": y["train"],
                "corpus_views": [f[cat]], "corpus_y": y[cat], "query_views": [f[q]],
                "query_y": y[q], "query_rows": None, "n_classes": 10, "extract_s": seconds,
                "head_args": {"epochs": 32, "learning_rate": 4e-4, "validation_split": 0.2}}
    tuned = name.endswith("-ft")  # the photos' features from the fine-tuned backbone
    name = name.removesuffix("-ft")
    feats, seconds = real_features(("train+validation" if final else "train")
                                   if tuned else None)
    data = real_photos()
    labels = {s: data[s][1] for s in data} if name == "real" else proxy_labels()
    train_s = ("train", "validation") if final else ("train",)
    corpus_s = ("train", "validation", "test") if final else ("train", "validation")
    query_s = "test" if final else "validation"
    classes = sorted({c for c in labels["train"] if c is not None})
    code = {c: i for i, c in enumerate(classes)}
    keep = {s: np.array([c in code for c in labels[s]]) for s in labels}
    enc = {s: np.array([code[c] for c in labels[s][keep[s]]], dtype=np.int64) for s in labels}
    views = list(feats.values())
    start = sum(int(keep[s].sum()) for s in corpus_s[:corpus_s.index(query_s)])
    return {"train_views": [np.concatenate([v[s][keep[s]] for s in train_s]) for v in views],
            "y_train": np.concatenate([enc[s] for s in train_s]),
            "corpus_views": [np.concatenate([v[s][keep[s]] for s in corpus_s])
                             for v in views],
            "corpus_y": np.concatenate([enc[s] for s in corpus_s]), "query_views": None,
            "query_rows": np.arange(start, start + int(keep[query_s].sum())),
            "n_classes": len(classes), "extract_s": seconds,
            "head_args": {"epochs": 64, "learning_rate": 5e-5, "validation_split": 0.0}}


def run_set(name, settings, seeds, final=False):
    """``{row name: mean metrics}`` of ``settings`` (``(loss name, expansion name)``)."""
    d = set_data(name, final)
    out, heads = {}, {}
    for loss_name, expansion_name in settings:
        qe, dba = EXPANSIONS[expansion_name]
        args = {**d["head_args"], "metric_loss": LOSSES[loss_name]}
        per_seed = [score(d, args, qe, dba, seed, heads) for seed in seeds]
        row = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
        row.update({f"{k}_sd": float(np.std([r[k] for r in per_seed], ddof=1))
                    if len(per_seed) > 1 else 0.0 for k in ("precision@6", "head_accuracy")})
        n_q = len(d["query_y"]) if d["query_rows"] is None else len(d["query_rows"])
        row.update(extract_s=d["extract_s"], n_queries=int(n_q),
                   n_corpus=int(len(d["corpus_y"])), n_classes=d["n_classes"],
                   seeds=list(seeds), loss=LOSSES[loss_name], qe=qe, dba=dba)
        out[loss_name + expansion_name] = row
        print(f"{name} {loss_name}{expansion_name}: p@6 {row['precision@6']:.4f} "
              f"acc {row['head_accuracy']:.4f} fit {row['fit_s']:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------ the runs
def validation_settings():
    """Every loss alone, every expansion on the recipe's head, and every expansion on
    each loss (a combination costs no extra training: the heads are reused)."""
    return [(loss, exp) for loss in LOSSES for exp in EXPANSIONS]


def write(name, title, results, notes):
    from fashionrec.artifacts import cpu_description

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    if path.is_file():  # sets run separately are kept together
        old = json.loads(path.read_text())["sets"]
        results = {**old, **{s: {**old.get(s, {}), **rows} for s, rows in results.items()}}
    record = {"experiment": name, "cpu": cpu_description(), "protocol": notes,
              "sets": results}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# {title}", "", f"Machine: {cpu_description()}.", "", notes, ""]
    for set_name, rows in results.items():
        first = next(iter(rows.values()))
        lines += [f"## {set_name}: {first['n_queries']} queries, corpus of "
                  f"{first['n_corpus']}, {first['n_classes']} classes, seeds "
                  f"{first['seeds']}; features extracted in {first['extract_s']:.0f} s "
                  "(once, cached)", "",
                  "| method | precision@6 | map@10 | head accuracy | head training s |",
                  "|---|---|---|---|---|"]
        for row_name, r in rows.items():
            lines.append(f"| {row_name} | {r['precision@6']:.4f} ± {r['precision@6_sd']:.4f} "
                         f"| {r['map@10']:.4f} | {r['head_accuracy']:.4f} ± "
                         f"{r['head_accuracy_sd']:.4f} | {r['fit_s']:.0f} |")
        lines.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("features", "validate", "final"))
    parser.add_argument("--sets", nargs="+", default=["fmnist", "real", "proxy"],
                        choices=("fmnist", "real", "proxy", "real-ft", "proxy-ft"),
                        help="-ft: the photos' features from the backbone fine-tuned "
                             "(FINE_TUNE) on the head's training photos and their 10 classes")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES),
                        help="validate: the losses to train (default: all)")
    parser.add_argument("--expansions", nargs="+", default=list(EXPANSIONS),
                        help="validate: the expansions to score (default: all)")
    parser.add_argument("--choice", nargs=2, action="append", metavar=("SET", "METHOD"),
                        help="final: the method chosen for a set on validation (a row name "
                             "of quality_methods.md); the recipe's row is always scored too")
    args = parser.parse_args()
    if args.command == "features":
        fmnist_features()
        real_features()
        proxy_labels()
        return
    if args.command == "validate":
        settings = [(lo, ex) for lo, ex in validation_settings()
                    if lo in args.losses and ex in args.expansions]
        results = {s: run_set(s, settings, args.seeds) for s in args.sets}
        write("quality_methods", "Better neighbours: every method on validation data",
              results, "Validation protocol (module doc of experiments/quality_methods.py); "
              "mean ± sd over the seeds each row lists. Held-out data is not touched.")
        return
    chosen = {}
    for set_name, method in args.choice or []:
        loss = next(lo for lo in sorted(LOSSES, key=len, reverse=True)
                    if method.startswith(lo))
        chosen.setdefault(set_name, []).append((loss, method[len(loss):]))
    results = {s: run_set(s, [("softmax (recipe)", "")] + chosen.get(s, []), args.seeds,
                          final=True) for s in args.sets}
    write("quality_methods_final", "Better neighbours: the chosen settings on held-out data",
          results, "Held-out protocol (module doc), run once with the settings chosen on "
          "validation; mean ± sd over the seeds each row lists.")


if __name__ == "__main__":
    main()
