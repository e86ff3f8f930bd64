"""How long-running library code reports progress without printing.

Library functions wrap their loops in :func:`track`; by default nothing is shown.
The CLI installs a rich renderer with :func:`reporting_to`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class ProgressSink(Protocol):
    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]: ...


class _Silent:
    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        yield from items


_sink: contextvars.ContextVar[ProgressSink] = contextvars.ContextVar("progress_sink", default=_Silent())


def track(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return _sink.get().track(items, total, description)


@contextlib.contextmanager
def reporting_to(sink: ProgressSink) -> Iterator[None]:
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
