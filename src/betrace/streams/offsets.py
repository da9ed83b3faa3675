"""Which offset a partition may commit: only past records that were processed.

faust's own rule (``Consumer._new_offset``) commits the run of acknowledged offsets
that starts at the lowest one, and it tolerates one missing offset at the head (meant
for a transaction marker) or any number when the partition was never committed
(``if committed_offset:``). Stages here acknowledge out of order (the span sink
releases a quiet tenant's events before a busy tenant's earlier ones), so that rule
committed past a message still in flight: lost for good after ``kill -9``. A record
faust fetched and then dropped was committed over the same way. Our topics have no
transaction markers and no compaction: every offset is a record, and a hole at the
head is one not processed yet.

:func:`take_run` is the commit rule; :class:`HoleJudge` decides what a hole at the
head means. A hole nothing explains is first re-read from the broker (a seek), and
only a hole that survives a re-read for :data:`HOLE_CONFIRM_S` is committed over.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable

#: How long a hole must stay after its re-read before it is taken as records that are
#: not there (a log start moved by retention), not records faust dropped again.
HOLE_CONFIRM_S = 10.0


class HeadHole(enum.Enum):
    """What to do about acknowledged offsets that do not start at the committed offset."""

    #: A message of the hole is still being processed: its acknowledgement will close it.
    WAIT = "wait"
    #: Nothing explains the hole: seek the partition back to its committed offset.
    REWIND = "rewind"
    #: Re-read and still empty: the broker has no records there; commit over it.
    SKIP = "skip"


class HoleJudge:
    """One decision per commit attempt for a partition with a hole at its head."""

    def __init__(self, confirm_s: float = HOLE_CONFIRM_S) -> None:
        self.confirm_s = confirm_s
        #: Partition -> (head offset it was sought back to, when).
        self._rewound: dict[Hashable, tuple[int, float]] = {}

    def decide(self, tp: Hashable, head: int, first: int, in_flight: Iterable[int], now: float) -> HeadHole:
        """``head`` is the committed offset, ``first`` the lowest acknowledged one (above it),
        ``in_flight`` the offsets of the partition's delivered, unacknowledged messages."""
        if any(head <= offset < first for offset in in_flight):
            return HeadHole.WAIT
        rewound = self._rewound.get(tp)
        if rewound is None or rewound[0] != head:
            self._rewound[tp] = (head, now)
            return HeadHole.REWIND
        if now - rewound[1] >= self.confirm_s:
            del self._rewound[tp]
            return HeadHole.SKIP
        return HeadHole.WAIT

    def forget(self, tp: Hashable) -> None:
        """``tp`` was revoked (or committed past its hole)."""
        self._rewound.pop(tp, None)


def take_run(acked: list[int], index: set[int], head: int) -> int | None:
    """The offset to commit (one past the run of consecutive acknowledged offsets that starts
    at ``head``), removing that run from ``acked`` (kept sorted) and ``index``; ``None``
    when ``head`` itself is not acknowledged (a hole, or nothing to commit).

    Offsets below ``head`` (already committed: acknowledged again after a seek) are
    dropped on the way.
    """
    acked.sort()
    stale = 0
    while stale < len(acked) and acked[stale] < head:
        stale += 1
    if stale:
        index.difference_update(acked[:stale])
        del acked[:stale]
    if not acked or acked[0] != head:
        return None
    end = 1
    while end < len(acked) and acked[end] == acked[end - 1] + 1:
        end += 1
    index.difference_update(acked[:end])
    last = acked[end - 1]
    del acked[:end]
    return last + 1
