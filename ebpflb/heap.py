"""The garbage collector around bulk work: the registry and the agent make long-lived,
acyclic objects (stored objects, records, map images) by the ten thousand."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def bulk_objects(bulk: bool = True) -> Iterator[None]:
    """Around the making of a bulk's objects (when bulk): no automatic collection
    meanwhile, as each full one would walk the whole growing heap and find nothing
    (they hold no cycles; reference counting frees what dies); then what is alive is
    frozen out of the collector's sight (gc.freeze), before collections resume, so
    that no later one walks it either (a single change would wait for it). No
    collection first: it would walk all of it once more."""
    if not bulk or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
