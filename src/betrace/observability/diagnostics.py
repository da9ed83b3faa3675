"""``kill -USR1 <worker pid>``: log where a worker's messages are held, without stopping it.

A worker whose group lag stops falling while it stays alive is waiting on
something: a paused partition, a head-of-line message never acknowledged (so
faust cannot commit past it), a sink buffer, a task blocked on the broker. The
dump logs each of those, read from faust's and the pipeline's own bookkeeping,
so a stall seen once in CI can be diagnosed from its log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

#: Task stacks are cut to this many frames each; the innermost ones say what a task awaits.
STACK_FRAMES = 6


def _tp(tp: Any) -> str:
    return f"{tp.topic}[{tp.partition}]"


def consumer_lines(consumer: Any) -> Iterator[str]:
    """Per assigned partition: read and committed offsets, and acks not yet committed.

    Acked offsets that stay uncommitted sit behind one that was never acked.
    """
    assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
    paused = {_tp(tp) for tp in getattr(consumer, "_paused_partitions", ())}
    active = getattr(consumer, "_active_partitions", None)
    yield (
        f"consumer: {len(assigned)} assigned, {len(paused)} paused, "
        f"flow {'active' if getattr(consumer, 'flow_active', True) else 'STOPPED'}, "
        f"{len(getattr(consumer, '_unacked_messages', ()))} unacknowledged messages"
    )
    acked = getattr(consumer, "_acked", {})
    for tp in assigned:
        pending = sorted(acked.get(tp, ()))
        head = f", {len(pending)} acked not committed (lowest {pending[0]})" if pending else ""
        inactive = active is not None and tp not in active
        state = "paused" if _tp(tp) in paused else ("inactive" if inactive else "")
        yield (
            f"  {_tp(tp)}: read {consumer._read_offset.get(tp)} "
            f"committed {consumer._committed_offset.get(tp)}{head} {state}".rstrip()
        )


def task_lines(limit: int = STACK_FRAMES) -> Iterator[str]:
    """Every task of the running loop with the innermost frames of its stack."""
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        frames = task.get_stack(limit=limit)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames)) or "-"
        yield f"  task {task.get_name()}: {where}"


def dump(app: Any, extra: dict[str, object]) -> None:
    """Log the state of ``app``'s consumer, table recovery, ``extra`` and every task."""
    lines = ["worker state (SIGUSR1):"]
    lines += [f"  {name}: {value}" for name, value in extra.items()]
    recovery = app.tables.recovery
    lines.append(
        f"recovery: in_recovery={recovery.in_recovery} active_remaining={recovery.active_remaining_total()}"
    )
    try:
        lines += list(consumer_lines(app.consumer))
    except Exception as exc:  # noqa: BLE001 - before the consumer exists, or while it restarts
        lines.append(f"consumer: unavailable ({exc!r})")
    lines.append("tasks:")
    lines += list(task_lines())
    logger.warning("\n".join(lines))


def dump_safely(app: Any, extra: Callable[[], dict[str, object]]) -> None:
    """:func:`dump`, logging instead of raising: a diagnostic must never take the worker down."""
    try:
        dump(app, extra())
    except Exception:
        logger.exception("worker state dump failed")
