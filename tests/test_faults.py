"""A fast slice of the fault suite (``experiments/faults.py``, where the full-size
figures come from): a real ``fashionrec serve`` process killed while adds arrive,
clients that leave mid-query, and a full photo queue."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import faults  # noqa: E402


def test_sigkill_during_adds_loses_no_acknowledged_add(trained_run, tmp_path):
    result = faults.case_kill_adds(trained_run[1], tmp_path, rounds=2)
    assert result["acked"] > 0, result
    assert result["holds"] and result["lost"] == 0 and result["load_failures"] == 0, result


def test_clients_that_leave_do_not_stop_photo_queries(trained_run, tmp_path):
    result = faults.case_disconnects(trained_run[1], tmp_path, leave=24, normal=12)
    assert result["holds"] and result["answered_200"] == 12, result


def test_a_full_queue_is_503_with_retry_after_and_nobody_waits_past_the_timeout(
        trained_run, tmp_path):
    result = faults.case_full_queue(trained_run[1], tmp_path, clients=16)
    assert result["holds"], result
