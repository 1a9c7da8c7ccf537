"""Extract (and cache) backbone features of every Fashion-MNIST image for the
experiments, recording speed and peak memory.

    python experiments/features.py --size 224                    # all 70,000 images
    python experiments/features.py --size 112 --n-train 15000   # a subset

Features go to experiments/out/features/ (not committed); the record of each run to
experiments/results/features-<backbone>-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
CACHE = HERE / "out" / "features"
RESULTS = HERE / "results"


def backbone_tag(backbone, weights):
    base = "resnet50" if backbone == "resnet50" else Path(backbone).stem
    return f"{base}-{weights if weights in ('imagenet', 'none') else Path(weights).stem}"


def get_features(size, backbone="resnet50", weights="imagenet", n_train=60000, n_test=10000,
                 progress=True, seed=1234):
    """``(f_train, f_test, info, record)`` for the first ``n_train`` training and
    ``n_test`` test images, extracted once and cached."""
    from fashionrec import FeatureExtractor, build_backbone, load_dataset
    from fashionrec.artifacts import peak_rss_mb
    from fashionrec.extract import cached_features

    ds = load_dataset("fashion_mnist")
    model, info = build_backbone(backbone, weights, size, seed=seed, log=print)
    ext = FeatureExtractor(model, info, batch_size=32)
    tag = f"{backbone_tag(backbone, weights)}-{size}"
    names = (f"{tag}-train{n_train}", f"{tag}-test{n_test}")
    cached = all((CACHE / f"{n}-{info.fingerprint}.h5").is_file() for n in names)
    t = time.perf_counter()
    f_train = cached_features(ext, ds.x_train[:n_train], CACHE, names[0], progress)
    f_test = cached_features(ext, ds.x_test[:n_test], CACHE, names[1], progress)
    record = {
        "backbone": info.describe(), "image_size": size, "images": n_train + n_test,
        "from_cache": cached,
        "seconds": time.perf_counter() - t,
        "peak_rss_mb": peak_rss_mb(),
    }
    return f_train, f_test, info, record


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-test", type=int, default=10000)
    args = p.parse_args()
    *_, info, record = get_features(args.size, args.backbone, args.weights, args.n_train,
                                    args.n_test)
    record["images_per_s"] = record["images"] / record["seconds"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"features-{backbone_tag(args.backbone, args.weights)}-{args.size}.json"
    if not record["from_cache"]:  # keep the record of a real extraction only
        out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
