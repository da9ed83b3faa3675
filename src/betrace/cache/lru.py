"""A bounded, thread-safe LRU with a per-entry expiry: the tier that answers when Redis is down."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

V = TypeVar("V")


class LocalLRU(Generic[V]):
    """At most ``max_entries`` values; the least recently used one goes first.

    An entry also expires ``ttl_s`` after it was written, like its Redis
    copy, so a value the process keeps serving during an outage is no older
    than the one Redis would have served.
    """

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            msg = "max_entries must be >= 1"
            raise ValueError(msg)
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str) -> V | None:
        now = self.clock()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[0] <= now:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: str, value: V, ttl_s: float | None = None) -> None:
        expires = self.clock() + (self.ttl_s if ttl_s is None else ttl_s)
        with self._lock:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
                self.evictions += 1

    def pop(self, key: str) -> V | None:
        with self._lock:
            item = self._data.pop(key, None)
        return None if item is None else item[1]

    def discard_where(self, predicate: Callable[[str], bool]) -> int:
        with self._lock:
            doomed = [k for k in self._data if predicate(k)]
            for key in doomed:
                del self._data[key]
        return len(doomed)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._data)

    def update(self, items: Iterable[tuple[str, V]]) -> None:
        for key, value in items:
            self.put(key, value)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
