"""Progress bars on stderr (tqdm), silent when asked or when stderr is not a terminal (CI, logs)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    # disable=None: tqdm draws only on a terminal, so piped or logged runs stay clean.
    yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, disable=None)
