"""Each process claims its own spool slot; a dead process's slot is taken over, spool and all."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from betrace.config import Settings
from betrace.resilience.wiring import spool_root


def _claim(data_dir: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    slot = spool_root(Settings(data_dir=Path(data_dir)))
    (slot / "left-behind").write_text(str(os.getpid()))
    out.put(str(slot))
    time.sleep(60)  # hold the slot until killed (no shared lock a SIGKILL could leave taken)


def test_two_live_processes_get_two_slots_and_a_killed_ones_slot_is_reused(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    first = ctx.Process(target=_claim, args=(str(tmp_path), out))
    second = ctx.Process(target=_claim, args=(str(tmp_path), out))
    first.start()
    slot_a = out.get(timeout=30)
    second.start()
    slot_b = out.get(timeout=30)
    assert slot_a != slot_b
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)  # the lock goes with the process
    first.join(10)
    # A restarted worker (here: this process) takes the dead worker's slot and its spool.
    mine = spool_root(Settings(data_dir=tmp_path))
    assert str(mine) == slot_a
    assert (mine / "left-behind").exists()
    assert spool_root(Settings(data_dir=tmp_path)) == mine  # stable within a process
    second.kill()
    second.join(10)
