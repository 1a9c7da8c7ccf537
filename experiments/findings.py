"""Do the regression tests of the service-hardening findings fail on the code they
were found in? Runs each finding's tests (this tree's ``tests/``) against another
source tree's ``fashionrec`` (``PYTHONPATH``) and against this one, and writes which
fail where, with the first line of each failure, to
``experiments/results/findings.md`` (and ``.json``).

    git worktree add ../bench-old 220889b
    python experiments/findings.py --before ../bench-old

A test written against today's API can fail on the old tree because that API did not
exist yet (an ImportError at collection, a missing option): the table shows the reason,
so a failure that proves the finding is told from one that only proves the API changed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FINDINGS = {
    1: ("Only JPEG, PNG and WebP are ever decoded", [
        "tests/test_findings.py::test_1_an_eps_upload_is_refused_without_running_ghostscript",
        "tests/test_images.py::test_eps_is_refused_without_pillow_trying_its_plugin",
        "tests/test_images.py::test_other_formats_are_refused_in_one_line",
        "tests/test_limits.py::test_the_library_pixel_budget_is_413_and_a_foreign_format_400"]),
    2: ("A pixel budget from the header, JPEG draft, no float64 copies", [
        "tests/test_findings.py::test_2_a_small_16_bit_png_of_88_megapixels_is_413_from_its_header",
        "tests/test_images.py::test_pixel_budget_is_checked_from_the_header",
        "tests/test_images.py::test_large_jpeg_decodes_at_reduced_scale",
        "tests/test_images.py::test_deep_gray_is_stretched_in_float32_like_float64",
        "tests/test_limits.py::test_a_photo_over_the_pixel_budget_is_413_before_the_batcher",
        "tests/test_limits.py::test_the_pixel_check_never_touches_the_process_wide_warning_filters"]),
    3: ("The photo batcher: bounded, timed, cancellation-safe, per-request errors", [
        "tests/test_findings.py::test_3_a_cancelled_photo_query_does_not_kill_the_batcher",
        "tests/test_batcher.py",
        "tests/test_limits.py::test_a_full_photo_queue_is_503_with_retry_after",
        "tests/test_limits.py::test_a_slow_photo_query_is_504_and_the_service_recovers",
        "tests/test_limits.py::test_a_client_that_leaves_drops_its_photo_query"]),
    4: ("Reloads off the event loop; readers never write graphs", [
        "tests/test_findings.py::test_4_health_answers_while_the_service_reloads_a_changed_catalog",
        "tests/test_serve.py::test_health_and_queries_answer_while_a_reload_runs",
        "tests/test_store.py::test_a_missing_stale_or_damaged_graph_is_rebuilt_not_trusted"]),
    5: ("Segments: few open files, automatic compaction, uploads kept once published", [
        "tests/test_findings.py::test_5_a_load_of_many_segments_works_under_a_low_open_file_limit",
        "tests/test_compaction.py"]),
    6: ("Ids checked in one place; uploads cleaned on every failure", [
        "tests/test_ids.py",
        "tests/test_serve.py::test_a_refused_or_failed_add_leaves_no_upload"]),
    7: ("No server path in an answer that needs no key", [
        "tests/test_serve.py::test_no_answer_holds_a_file_path",
        "tests/test_limits.py::test_photo_queries_off_name_no_server_path"]),
    8: ("Writes and limits: key before body, chunked 413, connections, display cache, "
        "vectorised categories", [
            "tests/test_findings.py::test_8_the_image_route_decodes_a_picture_once",
            "tests/test_limits.py::test_a_chunked_upload_over_the_limit_is_413",
            "tests/test_limits.py::test_uvicorn_answers_503_beyond_max_connections",
            "tests/test_pictures.py"]),
    9: ("CLI and catalogs: no overwriting a non-run, the demo's own folders, a locked "
        "feature cache, CSV paths inside the catalog", [
            "tests/test_findings.py::test_9_train_refuses_a_folder_that_is_not_a_run",
            "tests/test_cli.py::test_train_refuses_a_folder_that_holds_no_run",
            "tests/test_safety.py::test_demo_refuses_to_delete_a_folder_it_did_not_write",
            "tests/test_safety.py::test_a_second_extraction_leaves_the_first_ones_partial_file",
            "tests/test_safety.py::test_csv_rows_outside_the_folder_are_skipped"]),
    10: ("An empty catalog stops in one line", [
        "tests/test_findings.py::test_10_train_on_an_empty_folder_is_one_line",
        "tests/test_safety.py::test_train_on_an_empty_catalog_is_one_line",
        "tests/test_safety.py::test_train_on_an_empty_folder_in_a_process_has_no_traceback",
        "tests/test_safety.py::test_add_of_an_empty_catalog_is_one_line"]),
    11: ("A load maps the file it read, not the name again", [
        "tests/test_findings.py::test_11_a_file_renamed_over_the_index_mid_load_is_not_mixed_in"]),
}


def run_tests(tree, targets, xml):
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    # -P: the working directory (this tree) is not put first on sys.path, so the
    # package imported is the one PYTHONPATH names; checked before the tests run
    where = subprocess.run([sys.executable, "-P", "-c", "import fashionrec; "
                            "print(fashionrec.__file__)"], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"the tests would import {where}, not the package in {tree}")
    subprocess.run([sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-q",
                    "--tb=line", "--continue-on-collection-errors", f"--junitxml={xml}",
                    *targets], cwd=ROOT, env=env,
                   capture_output=True, text=True, timeout=3600)
    return parse(xml)


def parse(xml):
    """``{test name: (outcome, first line of the reason)}`` from a JUnit XML file."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.get("classname"):
            name = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        else:  # a file that could not be collected
            name = case.get("name").replace(".", "/") + ".py"
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (node.get("message") or node.text or "").strip().splitlines()
                reason = reason[0][:160] if reason else ""
                break
        out[name] = (outcome, reason)
    return out


def belongs(name, target):
    """Whether test ``name`` is (one of) ``target``: a test, a parametrized test, a test
    file, or a file that did not collect."""
    file = target.split("::")[0]
    return (name == target or name.startswith(target + "[") or name == file
            or ("::" not in target and name.startswith(file + "::")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the old source tree (e.g. 220889b)")
    p.add_argument("--label", default="220889b")
    args = p.parse_args(argv)
    targets = [t for _, tests in FINDINGS.values() for t in tests]
    with tempfile.TemporaryDirectory() as tmp:
        # one run per test file on the old tree: a file that does not import there
        # would stop pytest from running the others ("found no collectors")
        before = {}
        for n, file in enumerate(dict.fromkeys(t.split("::")[0] for t in targets)):
            before.update(run_tests(args.before, [t for t in targets
                                                  if t.split("::")[0] == file],
                                    Path(tmp) / f"before-{n}.xml"))
        after = run_tests(ROOT, targets, Path(tmp) / "after.xml")
    rows, summary = [], {}
    for number, (title, tests) in FINDINGS.items():
        names = sorted({n for n in set(before) | set(after)
                        if any(belongs(n, t) for t in tests)})
        outcomes = [before.get(n, ("not run",))[0] for n in names]
        ran_now = [n for n in names if n in after]
        passes_now = bool(ran_now) and all(after[n][0] == "passed" for n in ran_now) and all(
            any(belongs(n, t) for n in ran_now) for t in tests)
        summary[number] = {"title": title, "tests": len(names), "all_pass_now": passes_now,
                           **{k: outcomes.count(k) for k in ("failed", "error", "not run",
                                                             "passed", "skipped")}}
        for n in names:
            b = before.get(n, ("not run", "its file did not import there (line above)"))
            rows.append((number, n, b[0], b[1], after.get(n, ("missing", ""))[0]))
    out = HERE / "results"
    (out / "findings.json").write_text(json.dumps(
        {"before": args.label, "summary": summary,
         "tests": [dict(zip(("finding", "test", "before", "reason_before", "now"), r,
                            strict=True)) for r in rows]}, indent=2) + "\n")
    lines = [f"# The hardening findings' tests on {args.label} and now", "",
             "`python experiments/findings.py --before <worktree of "
             f"{args.label}>` (this tree's tests, the old tree's package).", "",
             f"On {args.label}: *failed* = the test ran and its check failed; *error* = a "
             "test file that does not import there (the API it exercises came later), or a "
             "fixture error; *not run* = a test of such a file; *passed* = holds there too.",
             "", "| finding | tests | failed | error | not run | passed on " + args.label
             + " | all pass now |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for number, s in summary.items():
        lines.append(f"| {number}. {s['title']} | {s['tests']} | {s['failed']} | "
                     f"{s['error']} | {s['not run']} | {s['passed']} | "
                     f"{'yes' if s['all_pass_now'] else '**no**'} |")
    lines += ["", "| finding | test | on " + args.label + " | why (first line) | now |",
              "| --- | --- | --- | --- | --- |"]
    for number, name, b, reason, now in rows:
        reason = reason.replace("|", "\\|")
        lines.append(f"| {number} | `{name.split('::')[-1]}` | {b} | {reason} | {now} |")
    (out / "findings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:10 + len(summary)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
