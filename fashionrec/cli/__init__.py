"""``fashionrec train | extract | recommend | add | remove | compact | index | evaluate |
plot | serve`` — a thin layer over the library.

:mod:`.parser` holds the grammar, :mod:`.commands` the sub-commands; here the entry
point. Every user error is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import sys

from ..errors import FashionrecError
from ..lean import serves_lean
from .commands import (
    cmd_add,
    cmd_compact,
    cmd_evaluate,
    cmd_extract,
    cmd_index,
    cmd_plot,
    cmd_recommend,
    cmd_remove,
    cmd_serve,
    cmd_train,
)
from .parser import build_parser

__all__ = ["COMMANDS", "build_parser", "main", "needs_tensorflow", "quiet"]

COMMANDS = {"train": cmd_train, "extract": cmd_extract, "recommend": cmd_recommend,
            "add": cmd_add, "remove": cmd_remove, "compact": cmd_compact, "index": cmd_index,
            "evaluate": cmd_evaluate, "plot": cmd_plot, "serve": cmd_serve}


def quiet(verbose=False, preload=True):
    """Keep the output to what a user needs: TensorFlow's start-up lines (written by its
    C++ libraries straight to the process's stderr while it is imported and looks for
    devices, whatever ``TF_CPP_MIN_LOG_LEVEL`` says), its retracing warnings and library
    warnings are hidden unless ``verbose``. A Python error while importing still
    surfaces. ``preload`` false: TensorFlow is not imported here (a command that may
    never need it, :func:`needs_tensorflow`); its log level is still set."""
    if verbose:
        return
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # one set by the user is kept
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if "tensorflow" in sys.modules or not preload:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401  (imports TensorFlow, the Keras backend)
        import tensorflow as tf

        # device discovery: where there is no GPU, CUDA's "failed call to cuInit" comes here
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def needs_tensorflow(args):
    """Whether the command may import TensorFlow (so :func:`quiet` imports it first,
    hushed): all but ``serve`` of a run that loads lean (:func:`fashionrec.lean.serves_lean`)."""
    if args.command != "serve" or args.engine_path == "keras":
        return True
    return not serves_lean(args.run_dir)


def main(argv=None):
    args = build_parser().parse_args(argv)
    quiet(getattr(args, "verbose", False), preload=needs_tensorflow(args))
    try:
        return COMMANDS[args.command](args)
    except (FashionrecError, OSError) as exc:  # OSError: e.g. an --out folder not writable
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a retrain publishes atomically: nothing half-written shows
        print("error: interrupted; the run's published version is unchanged", file=sys.stderr)
        return 130
