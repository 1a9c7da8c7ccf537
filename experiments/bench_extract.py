"""Feature-extraction benchmark: the seed's one-image-per-``predict`` loop against
fashionrec's batched, streamed extractor, on the same images in the same run, plus
peak memory of streaming extraction as the number of images grows.

    python experiments/bench_extract.py                 # speed (224 px) + memory sweep
    python experiments/bench_extract.py --full-memory   # also all 70,000 images at 224 px

Writes experiments/results/bench_extract.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def seed_loop(model, images, image_size):
    """The seed's extraction, faithfully: one image at a time, ``model.predict`` each."""
    import keras
    from keras.applications.resnet50 import preprocess_input

    feats = []
    for img in images:
        rgb = np.stack([img.astype("float32")] * 3, axis=-1)
        rgb = np.array(keras.ops.image.resize(rgb, (image_size, image_size)))
        x = preprocess_input(np.expand_dims(rgb, axis=0))
        feats.append(model.predict(x, verbose=0).flatten())
    return np.array(feats)


def speed(args):
    from fashionrec import FeatureExtractor, build_backbone, load_dataset

    ds = load_dataset("fashion_mnist")
    images = ds.x_test[: args.n_batched]
    model, info = build_backbone(args.backbone, args.weights, args.image_size)
    ext = FeatureExtractor(model, info, batch_size=args.batch_size)
    # warm both paths once (graph tracing) before timing
    seed_loop(model, images[:2], args.image_size)
    ext.transform(images[: args.batch_size])

    t = time.perf_counter()
    seed_feats = seed_loop(model, images[: args.n_seed], args.image_size)
    seed_s = time.perf_counter() - t
    t = time.perf_counter()
    feats = ext.transform(images, progress=True)
    batched_s = time.perf_counter() - t
    diff = float(np.abs(feats[: args.n_seed] - seed_feats).max())
    seed_ips = args.n_seed / seed_s
    batched_ips = len(images) / batched_s
    return {
        "backbone": info.describe(),
        "image_size": args.image_size,
        "seed_loop": {"images": args.n_seed, "seconds": seed_s, "images_per_s": seed_ips},
        "batched": {"images": len(images), "batch_size": args.batch_size,
                    "seconds": batched_s, "images_per_s": batched_ips},
        "speedup": batched_ips / seed_ips,
        "max_abs_feature_difference": diff,
    }


def memory_child(n, args):
    """Run in a subprocess: stream-extract n images into HDF5, report peak RSS."""
    import numpy as np

    from fashionrec import FeatureExtractor, build_backbone, load_dataset

    ds = load_dataset("fashion_mnist")
    images = np.concatenate([ds.x_train, ds.x_test])[:n]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, info = build_backbone(args.backbone, args.weights, args.image_size, log=None)
    ext = FeatureExtractor(model, info, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ext.transform_to_h5(images, Path(tmp) / "f.h5", progress=True)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": n, "peak_rss_mb": peak, "rss_after_data_mb": base_rss,
                      "seconds": seconds, "images_per_s": n / seconds}))


def memory(args, sizes):
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size),
               "--backbone", args.backbone, "--weights", args.weights]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"memory: {rows[-1]}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--n-seed", type=int, default=64, help="images through the seed loop")
    p.add_argument("--n-batched", type=int, default=256, help="images through the batched path")
    p.add_argument("--memory-sizes", default="500,2000",
                   help="comma-separated image counts for the memory sweep")
    p.add_argument("--full-memory", action="store_true",
                   help="add all 70,000 images to the memory sweep (about an hour on 2 cores)")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help="suffix for the result files")
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args)

    sizes = [int(s) for s in args.memory_sizes.split(",") if s]
    if args.full_memory:
        sizes.append(70000)
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "speed": speed(args),
        "memory": memory(args, sizes),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"bench_extract{args.tag}"
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["speed"]
    lines = [
        f"# Feature extraction benchmark ({s['image_size']} px)",
        "",
        f"Backbone: {s['backbone']}. Machine: {result['machine']['cpus']} CPUs.",
        "",
        "| path | images | images/s |",
        "| --- | ---: | ---: |",
        f"| seed loop (one `predict` per image) | {s['seed_loop']['images']} | "
        f"{s['seed_loop']['images_per_s']:.2f} |",
        f"| fashionrec batched (batch {s['batched']['batch_size']}) | {s['batched']['images']} | "
        f"{s['batched']['images_per_s']:.2f} |",
        "",
        f"Speed-up: **{s['speedup']:.2f}x**; largest feature difference between the two "
        f"paths: {s['max_abs_feature_difference']:.2e}.",
        "",
        "| images extracted (streamed to HDF5) | peak RSS (MB) | images/s |",
        "| ---: | ---: | ---: |",
    ]
    lines += [f"| {r['images']} | {r['peak_rss_mb']:.0f} | {r['images_per_s']:.1f} |"
              for r in result["memory"]]
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
