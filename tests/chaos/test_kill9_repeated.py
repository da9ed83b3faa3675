"""Scenario 1: ``kill -9`` of the worker at five random moments while load flows, then one drains."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from betrace.config import Settings
from tests.chaos.harness import ChaosRun

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]

KILLS = 5


def test_kill9_five_times_at_random_moments_loses_and_duplicates_nothing(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    run = ChaosRun("1. kill -9 worker x5", pipeline_settings, tmp_path, spans=4_000, seed=101)
    run.start_worker()
    run.load_in_background(chunks=KILLS * 2)
    for i in range(KILLS):
        # A random moment of the worker's life, seeded: mid-batch while the load is flowing.
        time.sleep(run.rng.uniform(0.2, 1.5))
        run.fault_begins(f"kill -9 of the worker, {KILLS} times at random moments")
        run.kill_worker()
        if i < KILLS - 1:
            run.start_worker()  # waits until ready: the next kill lands on a working worker
    run.fault_ends()
    run.start_worker(wait_ready=False)  # the final worker drains everything
    result = run.finish()
    assert result.detect_s is not None
    assert any("restored" in w.log_file.read_text(errors="replace") for w in run.workers[1:])
