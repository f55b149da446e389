"""Progress bars on stderr (tqdm), silent when asked or when stderr is not a terminal (CI, logs)."""

from __future__ import annotations

import contextlib
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


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def counter(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True):
    """A bar advanced by ``update(n)`` (e.g. tokens, with their rate per second)."""
    if not enabled:
        yield _Silent()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
              disable=None) as bar:
        yield bar
