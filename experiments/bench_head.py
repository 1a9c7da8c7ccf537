"""Head-training benchmark: the recipe's head (batch 64, 32 epochs, Adam 4e-4, dropout
0.7, balanced class weights, 20 % validation split) on the default run's cached
features, trained the way it was (one Keras step per call, no XLA) and the way it is
now (a whole epoch per call, XLA), over several seeds.

The features are the default run's feature cache (``make train`` writes
``runs/default/features/train-<fingerprint>.h5``: the first 15,000 Fashion-MNIST training
images through the stand-in ResNet50 stage 4 at 224 px); the labels are theirs. Only the
head's own validation split (the last 3,000 of those images) is scored.

    make train                              # once: the default run and its feature cache
    python experiments/bench_head.py        # writes experiments/results/bench_head.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
# name: (steps_per_execution, jit_compile)
VARIANTS = {
    "before: 1 step per call, no XLA": (1, False),
    "now: a whole epoch per call, no XLA": ("epoch", False),
    "a whole epoch per call, XLA": ("epoch", True),
}


def features(run_dir):
    import h5py

    from fashionrec.data import load_dataset

    files = sorted(Path(run_dir, "features").glob("train-*.h5"))
    if not files:
        sys.exit(f"no feature cache in {run_dir}/features: run `make train` first")
    with h5py.File(files[0], "r") as f:
        x = f["features"][...]
    y = load_dataset("fashion_mnist").y_train[:len(x)]
    return x, y, files[0].name


def child(variant, seed, run_dir):
    """One fit in a fresh process (nothing compiled or cached from another fit)."""
    from fashionrec.head import ClassifierHead

    x, y, name = features(run_dir)
    spe, jit = VARIANTS[variant]
    t = time.perf_counter()
    head = ClassifierHead(10, seed=seed, verbose=0, steps_per_execution=spe,
                          jit_compile=jit).fit(x, y)
    seconds = time.perf_counter() - t
    hist = head.history_
    print(json.dumps({"variant": variant, "seed": seed, "fit_s": seconds, "cache": name,
                      "n": len(x), "val_accuracy": hist["val_accuracy"][-1],
                      "val_loss": hist["val_loss"][-1]}))


def breakdown(steps=400):
    """Milliseconds per training step of the head at batch 64, by what the step does:
    the forward pass, forward + backward, and the whole step with Keras' Adam; and the
    same step with TensorFlow's fused Adam kernel (``ResourceApplyAdam``, the same
    update in one pass over the weights), an alternative measured here, not used."""
    import keras
    import tensorflow as tf

    from fashionrec.head import build_head_model

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(64, 1024)).astype(np.float32))
    y = tf.constant(keras.utils.to_categorical(rng.integers(0, 10, 64), 10))
    loss_fn = keras.losses.CategoricalCrossentropy()
    out = {}
    for part in ("forward", "forward+backward", "whole step, Keras Adam",
                 "whole step, fused TF Adam kernel"):
        model, opt = build_head_model(1024, 10), keras.optimizers.Adam(4e-4)
        opt.build(model.trainable_variables)

        def fused(grads, variables, opt=opt):
            step = tf.cast(opt.iterations + 1, tf.float32)
            for g, v in zip(grads, variables, strict=True):
                i = opt._get_variable_index(v)
                tf.raw_ops.ResourceApplyAdam(
                    var=v.handle, m=opt._momentums[i].handle, v=opt._velocities[i].handle,
                    beta1_power=tf.pow(opt.beta_1, step), beta2_power=tf.pow(opt.beta_2, step),
                    lr=tf.cast(opt.learning_rate, tf.float32), beta1=opt.beta_1,
                    beta2=opt.beta_2, epsilon=opt.epsilon, grad=g)
            opt.iterations.assign_add(1)

        @tf.function
        def run(n, part=part, model=model, opt=opt, fused=fused):
            acc = tf.constant(0.0)
            for _ in tf.range(n):
                if part == "forward":
                    acc += loss_fn(y, model(x, training=True))
                    continue
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                if part == "forward+backward":
                    acc += tf.add_n([tf.reduce_sum(g[:1]) for g in grads])
                elif part.endswith("Keras Adam"):
                    opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                    acc += loss
                else:
                    fused(grads, model.trainable_variables)
                    acc += loss
            return acc

        run(tf.constant(5))
        t = time.perf_counter()
        run(tf.constant(steps))
        out[part] = (time.perf_counter() - t) / steps * 1e3
        print(f"{part}: {out[part]:.2f} ms/step", flush=True)
    return out


def head_tflop(n_fit, n_val, epochs, dims=(1024, 1024, 512, 10)):
    """Arithmetic of a fit: forward+backward (3x forward) on the training rows, forward
    on the validation rows, every epoch."""
    forward = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    return epochs * forward * (3 * n_fit + n_val) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "default"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SEED"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help="the variants to fit (default: all); rows of variants not "
                             "fitted are kept from the last results")
    parser.add_argument("--breakdown", action="store_true",
                        help="only measure where a step's time goes (in a child)")
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.run_dir)
    if args.breakdown:
        return print(json.dumps(breakdown()))

    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_extract import matmul_peaks

    from fashionrec.artifacts import cpu_description

    old = OUT / "bench_head.json"
    rows = [r for r in (json.loads(old.read_text())["rows"] if old.is_file() else [])
            if r["variant"] not in args.variants]
    for variant in args.variants:
        seeds = args.seeds if variant.startswith(("before", "now")) else args.seeds[:1]
        for seed in seeds:
            out = subprocess.run([sys.executable, __file__, "--run-dir", args.run_dir,
                                  "--child", variant, str(seed)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{variant}, seed {seed}: {rows[-1]['fit_s']:.1f} s, "
                  f"val accuracy {rows[-1]['val_accuracy']:.4f}", flush=True)
    rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]))
    parts = json.loads(subprocess.run([sys.executable, __file__, "--breakdown"], check=True,
                                      capture_output=True, text=True).stdout.splitlines()[-1])
    peaks = matmul_peaks()
    n = rows[0]["n"]
    tflop = head_tflop(int(n * 0.8), n - int(n * 0.8), 32)
    result = {"machine": {"cpu": cpu_description(), "matmul_peak_gflops": peaks},
              "head_tflop": tflop, "rows": rows, "step_ms": parts}
    (OUT / "bench_head.json").write_text(json.dumps(result, indent=1) + "\n")
    write_md(result)


def write_md(result):
    peak = result["machine"]["matmul_peak_gflops"]["float32"]["numpy"]
    rows = result["rows"]
    before = [r for r in rows if r["variant"].startswith("before")]
    lines = [
        "# Head training: the recipe, before and after",
        "",
        f"Machine: {result['machine']['cpu']}; float32 matmul peak {peak:.0f} GFLOP/s "
        f"(NumPy, 2048²). Features: the default run's cache `{rows[0]['cache']}` "
        f"({rows[0]['n']} vectors, 1024-d). Recipe: batch 64, 32 epochs, Adam 4e-4, "
        "dropout 0.7, balanced class weights; validation = the last 20 % of the rows "
        "(never trained on). Each fit runs in its own process.",
        "",
        f"The fit's arithmetic is {result['head_tflop']:.2f} TFLOP: "
        f"{result['head_tflop'] * 1e3 / peak:.0f} s at this machine's float32 peak.",
        "",
        "| variant | seed | fit s | speed-up | share of peak | val accuracy | val loss |",
        "|---|---|---|---|---|---|---|",
    ]
    base = float(np.mean([r["fit_s"] for r in before]))
    for r in rows:
        share = result["head_tflop"] * 1e3 / r["fit_s"] / peak
        lines.append(f"| {r['variant']} | {r['seed']} | {r['fit_s']:.1f} | "
                     f"{base / r['fit_s']:.2f}× | {share:.0%} | {r['val_accuracy']:.4f} | "
                     f"{r['val_loss']:.4f} |")
    lines.append("")
    for tag in ("before", "now"):
        sel = [r for r in rows if r["variant"].startswith(tag)]
        acc = np.array([r["val_accuracy"] for r in sel])
        sec = np.array([r["fit_s"] for r in sel])
        lines.append(f"- {tag}: {sec.mean():.1f} s mean over {len(sel)} seeds; "
                     f"val accuracy {acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.4f}"
                     f" (mean ± sd)")
    steps = 32 * -(-int(rows[0]["n"] * 0.8) // 64)
    lines += ["", f"Where a step's time goes (batch 64, ms per step; a fit is {steps} steps):",
              "", "| the step does | ms/step | × steps = s per fit |", "|---|---|---|"]
    for part, ms in result["step_ms"].items():
        lines.append(f"| {part} | {ms:.2f} | {ms * steps / 1e3:.0f} |")
    (OUT / "bench_head.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
