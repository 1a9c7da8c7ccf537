"""The sub-commands: each reads its options, calls the public library and prints what a
user needs. Every path of a run folder comes from :class:`~fashionrec.rundir.RunDir`."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .. import attributes
from ..artifacts import read_json, write_json
from ..catalog import Catalog, format_skipped
from ..config import RunConfig
from ..errors import FashionrecError
from ..recommend import Recommender
from ..rundir import RunDir
from .parser import CATALOG_LAYOUT, CATALOG_OPTIONS, DBA_NAMES, SEARCH_NAMES

# the options that become a RunConfig, by what they decide
_FEATURE_OPTIONS = ("image_size", "image_fit", "flip", "pooling", "weights", "backbone",
                    "engine", "precision", "extract_batch_size", "seed")
_HEAD_OPTIONS = ("epochs", "learning_rate", "batch_size", "dropout", "train_on",
                 "metric_loss", "metric_weight", *DBA_NAMES, "fine_tune_blocks",
                 "fine_tune_epochs", "fine_tune_learning_rate")
_DATASET_OPTIONS = ("dataset", "data_dir", "n_train", "n_reco")


def config_from_args(args, catalog):
    """The :class:`RunConfig` of ``train`` or ``extract``: the options that decide the
    features, plus (train) the head's training and the search, plus (a Fashion-MNIST
    run, ``catalog`` false) which dataset images."""
    names = list(_FEATURE_OPTIONS)
    if args.command == "train":
        names += _HEAD_OPTIONS + SEARCH_NAMES
    if not catalog:
        names += _DATASET_OPTIONS
    return RunConfig(**{name: getattr(args, name) for name in names})


def _search_kwargs(args):
    return {name: getattr(args, name) for name in SEARCH_NAMES}


def _catalog_kwargs(args):
    return {name: getattr(args, name) for name in CATALOG_LAYOUT}


def _describe_search(spec):
    if spec["backend"] == "hnsw":
        return (f"HNSW search: M={spec['m']}, efConstruction={spec['ef_construction']}, "
                f"efSearch={spec['ef_search']}")
    return "exact search"


def _slug(text):
    return re.sub(r"[^A-Za-z0-9-]+", "_", str(text)).strip("_") or "query"


# ---------------------------------------------------------------- train, extract
def cmd_train(args):
    from ..plots import plot_history

    catalog = args.catalog is not None
    _check_train_options(args, catalog)
    cfg = config_from_args(args, catalog)
    run = RunDir(args.run_dir)
    run.check_target(args.force)  # before the training, not after it
    store = _store_choice(args, catalog)
    rec = (_fit_catalog if catalog else _fit_dataset)(args, cfg, run)
    rec.save(run.path, force=args.force, log=print)
    if store is not None:
        _move_store(rec, args, store)
    curves = plot_history(rec.head_.history_, run.plot("curves"))
    print(f"backbone:       {rec.metadata_['backbone_description']}")
    (_report_catalog if catalog else _report_dataset)(rec, cfg, run)
    print(f"curves:         {curves}")
    return 0


def _store_choice(args, catalog):
    """``--store``, checked before a training: Milvus for catalog runs, reachable."""
    if args.store is None:
        return None
    if args.store == "milvus":
        if not catalog:
            raise FashionrecError("--store milvus keeps product catalogs (--catalog), not "
                                  "a dataset's stored images")
        if not args.milvus_uri or not args.collection:
            raise FashionrecError("--store milvus needs --milvus-uri and --collection")
        from ..milvus import connect

        connect(args.milvus_uri)  # unreachable: one line now, not after the training
    return {"kind": args.store, "uri": args.milvus_uri, "collection": args.collection}


def _move_store(rec, args, store):
    record = rec.reindex(None, progress=not args.no_progress, store=store)
    where = (f"Milvus {record['uri']}, collection {record['collection']} (HNSW, L2)"
             if record["kind"] == "milvus" else "the run's files")
    print(f"index: {len(rec.index_)} items in {where}; recorded in "
          f"{RunDir(args.run_dir).run_file}")


def _check_train_options(args, catalog):
    """Options of the other kind of run are a mistake, not something to ignore."""
    if not catalog:
        flag = {"attribute_columns": "attributes"}
        given = [f"--{flag.get(k, k).replace('_', '-')}" for k, v in CATALOG_OPTIONS.items()
                 if getattr(args, k) != v]
        if given:
            raise FashionrecError(f"{', '.join(given)} appl(ies) only with --catalog")
        return
    d = RunConfig.__dataclass_fields__
    clash = [f"--{name.replace('_', '-')}" for name in _DATASET_OPTIONS
             if getattr(args, name) != d[name].default]
    if clash:
        raise FashionrecError(f"{', '.join(clash)} do(es) not apply to --catalog: every "
                              f"readable product trains the head and is indexed")


def _fit_dataset(args, cfg, run):
    print(f"fashionrec train: {cfg.dataset}, {cfg.n_train} training images, "
          f"{cfg.n_reco} catalog images, {cfg.image_size} px -> {run.path}", flush=True)
    return Recommender(cfg).fit(cache_dir=run.features, progress=not args.no_progress)


def _fit_catalog(args, cfg, run):
    catalog = Catalog.read(args.catalog, **_catalog_kwargs(args))
    print(f"fashionrec train: catalog {args.catalog} ({catalog.source['layout']}, "
          f"{len(catalog)} listed images), {cfg.image_size} px -> {run.path}", flush=True)
    return Recommender(cfg).fit_catalog(catalog, min_class_size=args.min_class_size,
                                        holdout=args.holdout, cache_dir=run.features,
                                        progress=not args.no_progress)


def _report_dataset(rec, cfg, run):
    t, version = rec.metadata_["timings"], run.current()
    print(f"head accuracy:  {rec.metadata_['head_test_accuracy']:.4f} "
          f"(first {cfg.n_reco} test images)")
    print(f"timings:        extract {t['extract_s']:.1f} s, head {t['head_s']:.1f} s, "
          f"index {t['index_s']:.1f} s, total {t['total_s']:.1f} s, "
          f"peak RSS {t['peak_rss_mb']:.0f} MB")
    print(f"run:            {run.run_file} (metadata)")
    print(f"head:           {version.head_model}, {version.head_state}")
    print(f"index:          {version.index} ({_describe_search(rec.search_spec)})")
    print(f"features cache: {run.features}")


def _report_catalog(rec, cfg, run):
    meta, version = rec.metadata_, run.current()
    t, split = meta["timings"], meta["dataset"]["split"]
    print(f"catalog:        {len(rec.index_)} products, {len(rec.class_names)} classes "
          f"({rec.report_['n_skipped']} skipped: {version.report})")
    if split["method"] != "none":
        print(f"split:          {split['train']} train, {split['validation']} validation, "
              f"{split['heldout']} held out ({split['method']}; {version.split})")
    val = meta.get("head_val_accuracy")
    if val is not None:
        where = ("validation/" if split["validation"] else
                 f"{cfg.validation_split:.0%} of the training products")
        print(f"head accuracy:  {val:.4f} (validation: {where})")
    held = meta.get("head_heldout_accuracy")
    if held is not None:
        print(f"head accuracy:  {held:.4f} (the {split['heldout']} held-out products; "
              f"`fashionrec evaluate` for retrieval)")
    print(f"timings:        extract {t['extract_s']:.1f} s, head {t['head_s']:.1f} s, "
          f"total {t['total_s']:.1f} s, peak RSS {t['peak_rss_mb']:.0f} MB")
    print(f"run:            {run.run_file}; index {version.index} "
          f"({_describe_search(rec.search_spec)})")


def cmd_extract(args):
    cfg = config_from_args(args, catalog=True)
    run = RunDir(args.run_dir)
    catalog = Catalog.read(args.catalog, **_catalog_kwargs(args))
    runner = None
    if args.ray is not None:
        from ..distributed import RayExtractor

        runner = RayExtractor(None if args.ray == "local" else args.ray,
                              workers=args.ray_workers, verbose=args.verbose)
    where = "here" if runner is None else f"on Ray ({runner.describe()})"
    print(f"fashionrec extract: catalog {args.catalog} ({len(catalog)} listed images), "
          f"{cfg.image_size} px, {where} -> {run.features}", flush=True)
    try:
        out = Recommender(cfg).extract_catalog(
            catalog, min_class_size=args.min_class_size, cache_dir=run.features,
            progress=not args.no_progress, runner=runner)
    finally:
        if runner is not None:
            runner.close()
    print(f"features:       {out['n_items']} products, {len(out['files'])} view file(s) in "
          f"{run.features}")
    if out["n_failed"]:
        print(f"unreadable:     {out['n_failed']} image(s), left out at training: "
              + ", ".join(list(out["failed"])[:5]))
    print(f"next:           fashionrec train --catalog {args.catalog} --run-dir {run.path} "
          f"(same options) uses them")
    return 0


# ---------------------------------------------------------------- queries, updates
def cmd_recommend(args):
    from ..plots import plot_recommendation

    rec = Recommender.load(args.run_dir)
    filters = dict(k=args.k, same_class=args.same_class, category=args.category,
                   where=args.where)
    if args.item is not None:
        result = rec.recommend(item=args.item, **filters)
        name = f"item-{_slug(args.item)}"
    elif args.idx is not None:
        result = rec.recommend(args.idx, **filters)
        name = f"idx{args.idx}"
    else:
        result = rec.recommend(args.image, **filters)
        name = _slug(Path(args.image).stem)
    out = Path(args.out) if args.out else RunDir(args.run_dir).plot(f"recommend-{name}")
    plot_recommendation(result, result.image, rec.item_image, out)
    if args.json:
        print(json.dumps({**result.to_dict(), "png": str(out)}, indent=2))
    else:
        print(result.format_text())
        print(f"png: {out}")
    return 0


def cmd_add(args):
    if args.id is not None and (args.image is None or len(args.image) != 1):
        raise FashionrecError("--id names a single --image")
    if args.allow_outside and args.catalog is None:
        raise FashionrecError("--allow-outside applies to a --catalog")
    if args.attr and args.catalog is not None:
        raise FashionrecError("--attr applies to --image; a catalog has its own attributes")
    rec = Recommender.load(args.run_dir)
    if args.catalog is not None:
        if args.label is not None:
            raise FashionrecError("--label applies to --image; a catalog has its own classes")
        catalog = rec.read_catalog(args.catalog, **_catalog_kwargs(args))
    else:
        given = attributes.parse_assignments(args.attr)
        catalog = Catalog.from_files(
            args.image, ids=None if args.id is None else [args.id],
            labels=None if args.label is None else [args.label] * len(args.image),
            attributes={k: [v] * len(args.image) for k, v in given.items()} or None)
    report = rec.add(catalog, progress=not args.no_progress,
                     log=None if args.json else print)
    if rec.refresh_error:
        print(f"fashionrec add: the products are saved, but reading the catalog back "
              f"failed ({rec.refresh_error})", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in report["added"][:20]:
            print(f"  + {item['id']}: {item['class']} ({item['class_from']})")
        if len(report["added"]) > 20:
            print(f"  ... and {len(report['added']) - 20} more")
        print("\n".join(format_skipped(report["skipped"])))
    return 0 if report["n_added"] or not report["skipped"] else 1


def cmd_remove(args):
    Recommender.load(args.run_dir).remove(args.ids)
    return 0


def cmd_compact(args):
    rec = Recommender.load(args.run_dir)
    rec.compact(progress=not args.no_progress)
    print(f"index: {len(rec.index_)} items in {RunDir(args.run_dir).current().index} "
          f"({_describe_search(rec.search_spec)})")
    return 0


def cmd_index(args):
    rec = Recommender.load(args.run_dir)
    params = _search_kwargs(args)
    if args.store is None and args.search is None:
        raise FashionrecError("give --search (how the catalog is searched) or --store "
                              "(where it lives)")
    if args.store is not None:
        if any(v is not None for v in params.values()):
            raise FashionrecError("--store moves the catalog; give the search options in "
                                  "another `fashionrec index` call")
        _move_store(rec, args, {"kind": args.store, "uri": args.milvus_uri,
                                "collection": args.collection})
        return 0
    spec = rec.reindex(params.pop("search"), progress=not args.no_progress, **params)
    pending = rec.index_.metadata.get("n_updates", 0)
    print(f"index: {len(rec.index_)} items, {_describe_search(spec)}; recorded in "
          f"{RunDir(args.run_dir).run_file}")
    if pending and spec["backend"] == "hnsw":
        print(f"note: products added since training are searched exactly until "
              f"`fashionrec compact --run-dir {args.run_dir}` folds {pending} update(s) in")
    return 0


# ---------------------------------------------------------------- scores, plots, service
def cmd_evaluate(args):
    from ..evaluate import evaluate, format_table
    from ..plots import plot_confusion, plot_per_class

    run = RunDir(args.run_dir)
    rec = Recommender.load(run.path)
    result = evaluate(rec, n_heldout=args.n_heldout, cache_dir=run.features,
                      progress=not args.no_progress)
    out = Path(args.out) if args.out else run.evaluation
    write_json(out, result)
    print(format_table(result))
    print(f"json:       {out}")
    print(f"per class:  {plot_per_class(result, run.plot('per_class'))}")
    print(f"confusion:  {plot_confusion(result, run.plot('confusion'))}")
    return 0


def cmd_plot(args):
    from ..plots import plot_history

    run = RunDir(args.run_dir)
    state = run.current().head_state  # no run: "no trained run in ...; run `make train`"
    history = read_json(state, "head file").get("history")
    if not history:
        raise FashionrecError(f"{state} holds no training history")
    out = Path(args.out) if args.out else run.plot("curves")
    print(f"curves: {plot_history(history, out)}")
    return 0


def cmd_serve(args):
    try:
        from ..serve import ServeSettings, run
    except ImportError as exc:
        raise FashionrecError(f"serve needs its extra: pip install 'fashionrec[serve]' "
                              f"({exc.name} is missing)") from None
    from ..images import MAX_PIXELS
    from ..lean import ENGINE_PATH_VAR, engine_path

    if args.engine_path:  # the workers of --workers N inherit it
        os.environ[ENGINE_PATH_VAR] = args.engine_path
    engine_path()  # a bad FASHIONREC_ENGINE_PATH is a one-line error
    key = os.environ.get("FASHIONREC_API_KEY") or None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise FashionrecError(f"API key file {args.api_key_file} is empty")
    if not args.max_upload_mb > 0 or not args.max_wait_ms >= 0:
        raise FashionrecError("--max-upload-mb must be > 0 and --max-wait-ms >= 0")
    if not args.photo_timeout_s > 0 or not 0 < args.max_megapixels <= MAX_PIXELS / 1e6:
        raise FashionrecError(f"--photo-timeout-s must be > 0 and --max-megapixels in "
                              f"(0, {MAX_PIXELS / 1e6:g}] (the library's budget)")
    if not 0 <= args.compact_removed_share <= 1 or not args.display_cache_mb >= 0:
        raise FashionrecError("--compact-removed-share must be in [0, 1] and "
                              "--display-cache-mb >= 0")
    settings = ServeSettings(run_dir=args.run_dir, api_key=key,
                             cors_origins=tuple(args.cors_origin),
                             max_upload_bytes=int(args.max_upload_mb * 2**20),
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, photo_timeout_s=args.photo_timeout_s,
                             max_pixels=int(args.max_megapixels * 1e6),
                             max_connections=args.max_connections,
                             compact_segments=args.compact_segments,
                             compact_removed_share=args.compact_removed_share,
                             display_cache_bytes=int(args.display_cache_mb * 2**20))
    run(settings, host=args.host, port=args.port, workers=args.workers,
        log=lambda message: print(message, flush=True))
    print("fashionrec serve: stopped", flush=True)
    return 0
