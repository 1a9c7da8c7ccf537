"""``fashionrec train | recommend | evaluate | plot`` — a thin layer over the library.

Every user error is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import DATASET_NAMES, RunConfig
from .errors import FashionrecError

DEFAULT_RUN_DIR = "runs/default"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(low):
    """An argparse type: an integer >= ``low``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}")
        return value
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def build_parser():
    d = RunConfig.__dataclass_fields__
    p = _Parser(prog="fashionrec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="extract features, train the head, build the catalog index",
                       description="Run the whole pipeline and save the run under --run-dir.")
    t.add_argument("--dataset", choices=DATASET_NAMES, default=d["dataset"].default,
                   help="which dataset (default: %(default)s)")
    t.add_argument("--data-dir", default=None,
                   help="folder searched first for the four IDX .gz files (then data/, "
                        "~/.keras/datasets, ../shared/datasets, then a checked download)")
    t.add_argument("--n-train", type=_positive, default=d["n_train"].default,
                   help="first N training images train the head (default: %(default)s)")
    t.add_argument("--n-reco", type=_positive, default=d["n_reco"].default,
                   help="first N test images form the catalog (default: %(default)s)")
    t.add_argument("--image-size", type=_positive, default=d["image_size"].default,
                   help="backbone input side in pixels, >= 32 (default: %(default)s)")
    t.add_argument("--epochs", type=_positive, default=d["epochs"].default,
                   help="head training epochs (default: %(default)s)")
    t.add_argument("--batch-size", type=_positive, default=d["batch_size"].default,
                   help="head training batch size (default: %(default)s)")
    t.add_argument("--extract-batch-size", type=_positive,
                   default=d["extract_batch_size"].default,
                   help="images per backbone call during extraction (default: %(default)s)")
    t.add_argument("--weights", default=d["weights"].default,
                   help="imagenet (Keras cache or checked download; falls back to the "
                        "../shared stage-4 stand-in), none (random) or a Keras weights file "
                        "(default: %(default)s)")
    t.add_argument("--backbone", default=d["backbone"].default,
                   help="resnet50, or a saved .keras model mapping (N,H,W,3) images to "
                        "(N,D) vectors (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d["seed"].default,
                   help="random seed (default: %(default)s)")
    t.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="where the run's files go (default: %(default)s)")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")

    r = sub.add_parser("recommend", help="the K catalog items nearest to a query",
                       description="Recommend catalog items for a test image or an image file.")
    q = r.add_mutually_exclusive_group(required=True)
    q.add_argument("--idx", type=int, help="index of the query in the test split")
    q.add_argument("--image", help="an image file (PNG, JPEG, ...) to use as the query")
    r.add_argument("-k", "--k", type=_positive, default=6,
                   help="how many items (default: %(default)s)")
    r.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="the trained run (default: %(default)s)")
    r.add_argument("--out", default=None,
                   help="PNG to write (default: RUN_DIR/plots/recommend-<query>.png)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")

    e = sub.add_parser("evaluate", help="retrieval quality and head accuracy of a trained run",
                       description="Score a run: every catalog item as a query (leave-one-out) "
                                   "and held-out test images as queries; precision@k, "
                                   "recall@k, mAP@10, 1-NN accuracy, per class; the head's "
                                   "accuracy and confusion matrix.")
    e.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="the trained run (default: %(default)s)")
    e.add_argument("--n-heldout", type=_non_negative, default=None,
                   help="held-out queries: test images after the catalog (default: all)")
    e.add_argument("--out", default=None,
                   help="JSON to write (default: RUN_DIR/evaluation.json)")
    e.add_argument("--no-progress", action="store_true", help="hide progress bars")

    pl = sub.add_parser("plot", help="training accuracy and loss curves as PNG",
                        description="Plot the head's accuracy and loss curves.")
    pl.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                    help="the trained run (default: %(default)s)")
    pl.add_argument("--out", default=None,
                    help="PNG to write (default: RUN_DIR/plots/curves.png)")
    return p


def cmd_train(args):
    from .plots import plot_history
    from .recommend import Recommender

    cfg = RunConfig(
        dataset=args.dataset, data_dir=args.data_dir, n_train=args.n_train,
        n_reco=args.n_reco, image_size=args.image_size, epochs=args.epochs,
        batch_size=args.batch_size, weights=args.weights, backbone=args.backbone,
        extract_batch_size=args.extract_batch_size, seed=args.seed,
    )
    run_dir = Path(args.run_dir)
    print(f"fashionrec train: {cfg.dataset}, {cfg.n_train} training images, "
          f"{cfg.n_reco} catalog images, {cfg.image_size} px -> {run_dir}", flush=True)
    rec = Recommender(cfg).fit(cache_dir=run_dir / "features", progress=not args.no_progress)
    rec.save(run_dir)
    curves = plot_history(rec.head_.history_, run_dir / "plots" / "curves.png")
    t = rec.metadata_["timings"]
    print(f"backbone:       {rec.metadata_['backbone_description']}")
    print(f"head accuracy:  {rec.metadata_['head_test_accuracy']:.4f} "
          f"(first {cfg.n_reco} test images)")
    print(f"timings:        extract {t['extract_s']:.1f} s, head {t['head_s']:.1f} s, "
          f"index {t['index_s']:.1f} s, total {t['total_s']:.1f} s, "
          f"peak RSS {t['peak_rss_mb']:.0f} MB")
    print(f"run:            {run_dir / 'run.json'} (metadata)")
    print(f"head:           {run_dir / 'head.keras'}, {run_dir / 'head.json'}")
    print(f"index:          {run_dir / 'index.h5'}")
    print(f"features cache: {run_dir / 'features'}")
    print(f"curves:         {curves}")
    return 0


def cmd_recommend(args):
    from .plots import plot_recommendation
    from .recommend import Recommender

    rec = Recommender.load(args.run_dir)
    query = args.idx if args.idx is not None else args.image
    result = rec.recommend(query, k=args.k)
    name = f"idx{args.idx}" if args.idx is not None else Path(args.image).stem
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots" / f"recommend-{name}.png"
    plot_recommendation(result, result.image,
                        lambda i: rec.index_.images[rec.index_.row_of(i)], out)
    if args.json:
        print(json.dumps({**result.to_dict(), "png": str(out)}, indent=2))
    else:
        print(result.format_text())
        print(f"png: {out}")
    return 0


def cmd_evaluate(args):
    from .artifacts import write_json
    from .evaluate import evaluate, format_table
    from .plots import plot_confusion, plot_per_class
    from .recommend import Recommender

    run_dir = Path(args.run_dir)
    rec = Recommender.load(run_dir)
    result = evaluate(rec, n_heldout=args.n_heldout, cache_dir=run_dir / "features",
                      progress=not args.no_progress)
    out = Path(args.out) if args.out else run_dir / "evaluation.json"
    write_json(out, result)
    print(format_table(result))
    print(f"json:       {out}")
    print(f"per class:  {plot_per_class(result, run_dir / 'plots' / 'per_class.png')}")
    print(f"confusion:  {plot_confusion(result, run_dir / 'plots' / 'confusion.png')}")
    return 0


def cmd_plot(args):
    from .artifacts import read_json
    from .plots import plot_history

    run_dir = Path(args.run_dir)
    if not (run_dir / "head.json").is_file():
        raise FashionrecError(f"no trained run in {run_dir}; run `make train` first")
    history = read_json(run_dir / "head.json", "head file").get("history")
    if not history:
        raise FashionrecError(f"{run_dir / 'head.json'} holds no training history")
    out = Path(args.out) if args.out else run_dir / "plots" / "curves.png"
    print(f"curves: {plot_history(history, out)}")
    return 0


COMMANDS = {"train": cmd_train, "recommend": cmd_recommend, "evaluate": cmd_evaluate,
            "plot": cmd_plot}


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (FashionrecError, OSError) as exc:  # OSError: e.g. an --out folder not writable
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; files already saved are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
