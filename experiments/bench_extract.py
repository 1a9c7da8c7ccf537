"""Feature-extraction benchmark: the seed's one-image-per-``predict`` loop, Keras
float32 (and bfloat16) batched, and OpenVINO float32 and bfloat16 batched, on the same
images in the same run, at each image size; the achieved rate as a share of this
machine's matrix-multiply peak (float32 and bfloat16, measured in the same run); the
end-to-end catalog extraction of real JPEGs (decode, fit and mirror in background
threads) against the model-only rate of the same engine; and, as separate commands,
held-out quality with each engine and peak memory of streaming extraction.

    python experiments/bench_extract.py                        # speed at 112 and 224 px
    python experiments/bench_extract.py quality                # precision@6 per engine
    python experiments/bench_extract.py memory                 # peak RSS vs image count

Writes experiments/results/bench_extract{,_quality,_memory}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from fashionrec.artifacts import cpu_description, peak_rss_mb  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
REAL = Path(__file__).resolve().parents[1].parent / "shared/datasets/clothing-dataset-small"
ENGINES = [("keras", "float32"), ("keras", "bfloat16"), ("openvino", "float32"),
           ("openvino", "bfloat16")]


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


def batched(x, batch_size):
    """``(start, batch)`` pairs for an engine's ``map``: the model alone, at its best
    (OpenVINO keeps the next batch queued, as in extraction)."""
    return ((i, x[i:i + batch_size]) for i in range(0, len(x), batch_size))


def _best_rate(fn, flops, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return flops / min(times) / 1e9


def matmul_peaks(n=2048):
    """Best matmul rate (GFLOP/s, 2048x2048) per precision: float32 from NumPy's BLAS,
    Keras and OpenVINO; bfloat16 from Keras and OpenVINO (bf16 inference hint)."""
    import keras

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2 * n**3
    f32 = {"numpy": _best_rate(lambda: a @ b, flops)}
    ta, tb = keras.ops.convert_to_tensor(a), keras.ops.convert_to_tensor(b)
    f32["keras"] = _best_rate(lambda: keras.ops.convert_to_numpy(keras.ops.matmul(ta, tb)),
                              flops)
    ha, hb = keras.ops.cast(ta, "bfloat16"), keras.ops.cast(tb, "bfloat16")
    bf16 = {"keras": _best_rate(lambda: keras.ops.convert_to_numpy(
        keras.ops.cast(keras.ops.matmul(ha, hb), "float32")), flops)}
    try:
        import openvino as ov
        from openvino import opset13 as ops

        p = ops.parameter([n, n], np.float32, name="a")
        model = ov.Model([ops.matmul(p, ops.constant(b), False, False)], [p])
        for name, hint, out in (("openvino", "f32", f32), ("openvino", "bf16", bf16)):
            compiled = ov.Core().compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
            out[name] = _best_rate(lambda c=compiled: c(a), flops)
    except ImportError:
        pass
    return {"float32": f32, "bfloat16": bf16}


def backbone_gmacs(model, image_size):
    """Multiply-accumulates of the backbone's conv and dense layers for one image."""
    import keras

    layers = [layer for layer in model.layers
              if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    outs = probe.predict_on_batch(np.zeros((1, image_size, image_size, 3), np.float32))
    macs = 0
    for layer, out in zip(layers, outs, strict=True):
        kernel = layer.kernel.shape  # (kh, kw, cin, cout) or (cin, cout)
        macs += int(np.prod(out.shape[1:-1])) * int(np.prod(kernel))
    return macs / 1e9


def _have_openvino():
    from fashionrec.engine import openvino_version

    return openvino_version() is not None


def speed(args, size, images, peaks):
    """Seed loop and every engine/precision, batched, on the same images."""
    from fashionrec import FeatureExtractor, build_backbone
    from fashionrec.extract import to_model_input

    model, info = build_backbone(args.backbone, args.weights, size, log=None, engine="keras",
                                 precision="float32")
    gmacs = backbone_gmacs(model, size)
    seed_loop(model, images[:2], size)  # warm (graph tracing)
    t = time.perf_counter()
    seed_feats = seed_loop(model, images[: args.n_seed], size)
    seed_ips = args.n_seed / (time.perf_counter() - t)
    x = to_model_input(images, size)  # model-only: inputs prepared beforehand
    rows, ref = [], None
    for engine, precision in ENGINES:
        if engine == "openvino" and not _have_openvino():
            continue
        m, inf = build_backbone(args.backbone, args.weights, size, log=None, engine=engine,
                                precision=precision)
        ext = FeatureExtractor(m, inf, batch_size=args.batch_size)
        ext.engine(x[: args.batch_size])  # warm
        t = time.perf_counter()
        feats = np.concatenate([f for _, f in ext.engine.map(batched(x, args.batch_size))])
        ips = len(x) / (time.perf_counter() - t)
        ref = feats if ref is None else ref
        cos = np.sum(feats * ref, 1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
        peak = max(peaks[precision].values())
        rows.append({"engine": engine, "precision": precision, "images_per_s": ips,
                     "speedup_vs_seed": ips / seed_ips, "gflops": 2 * gmacs * ips,
                     "share_of_peak": 2 * gmacs * ips / peak, "peak_gflops": peak,
                     "mean_cosine_to_keras_float32": float(cos.mean()),
                     "min_cosine_to_keras_float32": float(cos.min())})
        print(f"{size} px {engine} {precision}: {ips:.1f} img/s", flush=True)
    return {"backbone": info.describe(), "image_size": size, "gmac_per_image": gmacs,
            "seed_loop": {"images": args.n_seed, "images_per_s": seed_ips,
                          "max_abs_difference_to_batched": float(
                              np.abs(ref[: args.n_seed] - seed_feats).max())},
            "batched": {"images": len(x), "batch_size": args.batch_size}, "engines": rows}


def real_photos(n):
    files = sorted(p for p in REAL.glob("*/*/*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEGs under {REAL}")
    return files[:n]


def end_to_end(args):
    """Catalog extraction of real JPEGs in the catalog default's views (pad+crop, each
    mirrored: every file decoded once, four backbone inputs), with the auto engine:
    the whole pipeline (files -> features) against the model alone on the same inputs,
    in ``args.rounds`` alternating rounds (the machine's other load varies: the median
    share is the result)."""
    from fashionrec import FeatureExtractor, build_backbone
    from fashionrec.catalog import ImageFiles
    from fashionrec.config import RunConfig
    from fashionrec.extract import to_model_input

    cfg = RunConfig().resolved(catalog=True)
    views = cfg.views()
    paths = real_photos(args.n_real)
    out = []
    for engine, precision in [("auto", "auto"), ("keras", "float32")]:
        model, info = build_backbone(args.backbone, args.weights, args.image_size, log=None,
                                     pooling=cfg.pooling, engine=engine, precision=precision)
        ext = FeatureExtractor(model, info, batch_size=args.batch_size)
        files = ImageFiles(paths, args.image_size, views=views)
        inputs = to_model_input(files.load(0, len(files))[0].reshape(
            -1, args.image_size, args.image_size, 3), args.image_size)
        ext.engine(inputs[: args.batch_size])  # warm
        rounds = []
        for r in range(args.rounds):
            t = time.perf_counter()
            for _ in ext.engine.map(batched(inputs, args.batch_size)):
                pass
            model_ips = len(inputs) / (time.perf_counter() - t)
            t = time.perf_counter()
            for _ in ext.iter_batches(files, progress=True,
                                      desc=f"{info.engine} {info.precision} {r + 1}"):
                pass
            e2e_ips = len(inputs) / (time.perf_counter() - t)
            rounds.append({"model_only_inputs_per_s": model_ips,
                           "end_to_end_inputs_per_s": e2e_ips,
                           "share_of_model_only": e2e_ips / model_ips})
        t = time.perf_counter()
        for i in range(0, len(files), 8):
            files.load(i, i + 8)
        decode_s = time.perf_counter() - t
        mid = sorted(rounds, key=lambda r: r["share_of_model_only"])[len(rounds) // 2]
        out.append({"engine": info.engine, "precision": info.precision, "files": len(paths),
                    "views": len(views), **mid,
                    "end_to_end_files_per_s": mid["end_to_end_inputs_per_s"] / len(views),
                    "rounds": rounds,
                    "decode_alone_files_per_s_one_thread": len(paths) / decode_s,
                    "decode_workers": ext.workers,
                    "engine_streams": getattr(ext.engine, "streams", None)})
        print(json.dumps(out[-1]), flush=True)
    return out


def cmd_speed(args):
    from fashionrec import load_dataset

    images = load_dataset("fashion_mnist").x_test[: args.n_batched]
    peaks = matmul_peaks()
    print(f"matmul peaks (GFLOP/s): {peaks}", flush=True)
    speeds = [speed(args, int(size), images, peaks) for size in args.sizes.split(",")]
    e2e = end_to_end(args)
    result = {"machine": {"cpu": cpu_description(), "cpus": os.cpu_count(),
                          "matmul_peak_gflops": peaks},
              "speed": speeds, "end_to_end": e2e}
    write(f"bench_extract{args.tag}", result, speed_report(result))


def speed_report(result):
    peaks = result["machine"]["matmul_peak_gflops"]
    speeds = result["speed"]
    lines = [
        "# Feature extraction benchmark",
        "",
        "`python experiments/bench_extract.py` (results: bench_extract.json).",
        "",
        f"Machine: {result['machine']['cpu']}. Matmul peak (2048x2048, best of the "
        f"libraries, same run): float32 {max(peaks['float32'].values()):.0f} GFLOP/s, "
        f"bfloat16 {max(peaks['bfloat16'].values()):.0f} GFLOP/s. Backbone: "
        f"{speeds[0]['backbone'].rsplit(' at ', 1)[0]}.",
        "",
        "Model only (inputs prepared beforehand), batch "
        f"{speeds[0]['batched']['batch_size']}, {speeds[0]['batched']['images']} images; "
        f"the seed's loop: {speeds[0]['seed_loop']['images']} images, one `model.predict` each:",
        "",
        "| size (px) | path | img/s | vs seed loop | GFLOP/s | of its precision's peak | "
        "cosine to Keras float32 (mean / min) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in speeds:
        lines.append(f"| {r['image_size']} | seed loop (Keras, one image per call) | "
                     f"{r['seed_loop']['images_per_s']:.1f} | 1.0x | | | |")
        for e in r["engines"]:
            lines.append(
                f"| {r['image_size']} | {e['engine']} {e['precision']} | "
                f"{e['images_per_s']:.1f} | **{e['speedup_vs_seed']:.1f}x** | {e['gflops']:.0f} | "
                f"{100 * e['share_of_peak']:.0f}% | {e['mean_cosine_to_keras_float32']:.6f} / "
                f"{e['min_cosine_to_keras_float32']:.6f} |")
    lines += ["", "End to end: real JPEGs (clothing-dataset-small, "
              f"{result['end_to_end'][0]['files']} files) read, decoded once, fitted pad and "
              "crop, each mirrored (4 backbone inputs per file, the catalog default) in "
              "background threads while the engine computes; against the same engine on the "
              "same inputs prepared beforehand. Model only and end to end alternate for "
              f"{len(result['end_to_end'][0]['rounds'])} rounds; the round with the median "
              "share is shown, every round's share beside it:", "",
              "| engine | model only (inputs/s) | end to end (inputs/s) | files/s | share | "
              "every round |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for e in result["end_to_end"]:
        every = ", ".join(f"{100 * r['share_of_model_only']:.0f}%" for r in e["rounds"])
        lines.append(f"| {e['engine']} {e['precision']} | {e['model_only_inputs_per_s']:.1f} | "
                     f"{e['end_to_end_inputs_per_s']:.1f} | {e['end_to_end_files_per_s']:.1f} | "
                     f"**{100 * e['share_of_model_only']:.0f}%** | {every} |")
    return lines


def write(name, result, lines):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def memory_child(n, args):
    """Run in a subprocess: stream-extract n images into HDF5, report peak RSS."""
    from fashionrec import FeatureExtractor, build_backbone, load_dataset

    ds = load_dataset("fashion_mnist")
    images = np.concatenate([ds.x_train, ds.x_test])[:n]
    base_rss = peak_rss_mb()
    model, info = build_backbone(args.backbone, args.weights, args.image_size, log=None,
                                 engine="auto", precision="auto")
    ext = FeatureExtractor(model, info, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ext.transform_to_h5(images, Path(tmp) / "f.h5", progress=True)
        seconds = time.perf_counter() - t
    print(json.dumps({"image_size": args.image_size, "images": n, "peak_rss_mb": peak_rss_mb(),
                      "rss_after_data_mb": base_rss, "seconds": seconds,
                      "images_per_s": n / seconds, "engine": info.describe_engine()}))


def cmd_memory(args):
    """Peak memory of a fresh process per image count (streamed extraction)."""
    rows = []
    for n in (int(x) for x in args.memory_sizes.split(",")):
        cmd = [sys.executable, __file__, "memory", "--memory-child", str(n), "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size),
               "--backbone", args.backbone, "--weights", args.weights]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"memory: {rows[-1]}", flush=True)
    lines = ["# Streaming extraction: peak memory", "",
             f"`python experiments/bench_extract.py memory`. Machine: {cpu_description()}. "
             "Peak RSS of a fresh process (TensorFlow, the whole dataset and the model "
             "included), Fashion-MNIST images streamed to HDF5:", "",
             "| size (px) | engine | images | peak RSS (MB) | images/s |",
             "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['image_size']} | {r['engine']} | {r['images']} | {r['peak_rss_mb']:.0f} | "
              f"{r['images_per_s']:.1f} |" for r in rows]
    write("bench_extract_memory", {"machine": cpu_description(), "memory": rows}, lines)


def cmd_quality(args):
    """Held-out precision@6 with each engine and precision: the default Fashion-MNIST
    run (every engine trains its own head) and the real-photo set (split folders)."""
    from fashionrec import Recommender, RunConfig
    from fashionrec.catalog import Catalog
    from fashionrec.evaluate import evaluate

    cache = Path(args.cache)
    rows = []
    for engine, precision in [e for e in ENGINES if e[0] == "openvino" or e[1] == "float32"]:
        if engine == "openvino" and not _have_openvino():
            continue
        for data in args.datasets.split(","):
            t = time.perf_counter()
            cfg = RunConfig(engine=engine, precision=precision)
            features = cache / f"{data}-{engine}-{precision}"
            if data == "fashion_mnist":
                rec = Recommender(cfg).fit(cache_dir=cache / "fmnist", progress=True, log=print)
                res = evaluate(rec, cache_dir=cache / "fmnist", progress=False)
                p6 = res["heldout"]["overall"]["precision@6"]
                acc = res["head"]["accuracy"]
            else:
                rec = Recommender(cfg).fit_catalog(Catalog.read(REAL), cache_dir=cache / "real",
                                                   progress=True, log=print)
                rec.save(features)
                res = evaluate(Recommender.load(features), cache_dir=cache / "real",
                               progress=False)
                p6 = res["heldout"]["overall"]["precision@6"]
                acc = res["head"]["accuracy"]
            rows.append({"dataset": data, "engine": engine, "precision": precision,
                         "heldout_precision@6": p6, "head_accuracy": acc,
                         "seconds": time.perf_counter() - t,
                         "extract_s": rec.metadata_["timings"]["extract_s"]})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["# Quality with each engine and precision", "",
             f"`python experiments/bench_extract.py quality`. Machine: {cpu_description()}. "
             "Each row extracts its own features and trains its own head (same seed). "
             "Fashion-MNIST: the default run (15,000 training images, 5,000 catalog, 224 px), "
             "the 5,000 test images after the catalog as held-out queries. Real photos: "
             "clothing-dataset-small at 224 px (catalog defaults), its 372 test/ photos as "
             "queries.", "",
             "| data | engine | held-out precision@6 | head accuracy | extraction (s) |",
             "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['dataset']} | {r['engine']} {r['precision']} | "
              f"{r['heldout_precision@6']:.4f} | {r['head_accuracy']:.4f} | "
              f"{r['extract_s']:.0f} |" for r in rows]
    write("bench_extract_quality", {"machine": cpu_description(), "rows": rows}, lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="speed", choices=("speed", "quality", "memory"))
    p.add_argument("--sizes", default="112,224", help="comma-separated image sizes")
    p.add_argument("--image-size", type=int, default=224,
                   help="image size of the end-to-end run and the memory sweep")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--n-seed", type=int, default=32, help="images through the seed loop")
    p.add_argument("--n-batched", type=int, default=256, help="images through each engine")
    p.add_argument("--n-real", type=int, default=256, help="real JPEGs, end to end")
    p.add_argument("--rounds", type=int, default=3, help="end to end: alternating rounds")
    p.add_argument("--memory-sizes", default="500,2000,4000",
                   help="comma-separated image counts for the memory sweep")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--datasets", default="fashion_mnist,real", help="quality: which data")
    p.add_argument("--cache", default="experiments/out/engines",
                   help="quality: feature caches (one per engine, reused when re-run)")
    p.add_argument("--tag", default="", help="suffix for the speed result files")
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args)
    return {"speed": cmd_speed, "quality": cmd_quality, "memory": cmd_memory}[args.command](args)


if __name__ == "__main__":
    main()
