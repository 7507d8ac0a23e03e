"""The per-packet bench (python -m ebpflb.datapath.bench) runs, prints what the full bench
parses, and leaves no pins behind."""

from __future__ import annotations

import pytest

from ebpflb.bench import perpacket
from ebpflb.datapath import bench
from tests.datapath.conftest import BPFFS, skip_reason

pytestmark = pytest.mark.datapath


def test_a_small_run_prints_both_tables_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    before = set(BPFFS.glob("ebpflb-bench-*"))
    argv = ["--services", "1,40", "--repeat", "400", "--rounds", "2", "--instances", "1"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    table, ratios = perpacket.parse_table(out), perpacket.parse_ratios(out)
    paths = [p.name for p in bench.PATHS] + [bench.COLD_NEW_FLOW, bench.EMPTY]
    assert sorted(table) == [1, 40] and all(list(table[n]) == paths for n in table)
    assert list(ratios) == [40] and list(ratios[40]) == paths[:-1]
    # rewrites and two LRU inserts cost more than the empty program: the paths ran
    assert all(table[n][p] > 0 for n in table for p in ("conntrack hit", bench.NEW_FLOW))
    assert set(BPFFS.glob("ebpflb-bench-*")) <= before
