"""heap.bulk_objects: collections off while a bulk is made, then what it made frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ebpflb.heap import bulk_objects

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    """The collector as every other test finds it: enabled, nothing frozen."""
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


def test_a_bulk_is_made_without_collections_then_frozen() -> None:
    with bulk_objects():
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]  # tracked objects
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(made)


def test_a_failed_bulk_still_resumes_collections() -> None:
    with pytest.raises(RuntimeError), bulk_objects():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_no_bulk_or_collections_already_off_change_nothing() -> None:
    with bulk_objects(bulk=False):
        assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    gc.disable()
    with bulk_objects():
        pass
    assert not gc.isenabled() and gc.get_freeze_count() == 0
