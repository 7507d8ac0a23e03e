"""The benchmark's pure parts: statistics, targets, parsing the datapath bench, Apply batches."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from ebpflb.bench import loadgen, manifests, measure, perpacket, report, stats
from ebpflb.bench.measure import LoadSettings, MeasureError
from ebpflb.bench.model import FakePods, filler_services
from ebpflb.bench.progress import Progress
from ebpflb.bench.runner import Plan, Runner

pytestmark = pytest.mark.unit

DATAPATH_BENCH_OUTPUT = """\
ns per packet (minus empty program)              1       1,000     100,000
no service                                      93          58          90
conntrack hit                                  412         333         494
conntrack hit, nothing to rewrite              166         163         181
conntrack miss (new flow)                     2074        1393        1524
empty program (absolute)                        41          40          44
(services: frontends in the map; conntrack hit and reverse NAT include the rewrite)
"""


def test_parse_table_of_the_datapath_bench() -> None:
    table = perpacket.parse_table("compiling...\n" + DATAPATH_BENCH_OUTPUT)
    assert sorted(table) == [1, 1000, 100_000]
    assert table[1]["conntrack hit"] == 412
    assert table[100_000]["conntrack hit, nothing to rewrite"] == 181
    assert table[1000]["conntrack miss (new flow)"] == 1393
    assert "(services: frontends in the map; conntrack hit and reverse NAT include" not in table[1]


INTERLEAVED_BENCH_OUTPUT = """\
ns per packet (minus empty program)              1     100,000
conntrack hit                                  250         270
conntrack miss (new flow)                     1576        1724
empty program (absolute)                        43          43

ratio to 1 Service (median of rounds)                  100,000
conntrack hit                                            1.013
conntrack miss (new flow)                                1.072

(services: frontends in the map)
"""


def test_parse_the_interleaved_bench_and_its_ratios() -> None:
    table = perpacket.parse_table(INTERLEAVED_BENCH_OUTPUT)
    assert table == {
        1: {
            "conntrack hit": 250,
            "conntrack miss (new flow)": 1576,
            "empty program (absolute)": 43,
        },
        100_000: {
            "conntrack hit": 270,
            "conntrack miss (new flow)": 1724,
            "empty program (absolute)": 43,
        },
    }  # the ratio table after the empty line is not taken for more paths
    ratios = perpacket.parse_ratios(INTERLEAVED_BENCH_OUTPUT)
    assert ratios == {100_000: {"conntrack hit": 1.013, "conntrack miss (new flow)": 1.072}}
    assert perpacket.parse_ratios(DATAPATH_BENCH_OUTPUT) == {}


def test_parse_table_without_a_table_fails() -> None:
    with pytest.raises(perpacket.PerPacketError, match="no 'ns per packet' table"):
        perpacket.parse_table("Traceback...\n")


def test_median_table_over_rounds() -> None:
    rounds = [{1: {"a": 10.0}}, {1: {"a": 30.0}}, {1: {"a": 20.0, "b": 5.0}}]
    assert perpacket.median_table(rounds) == {1: {"a": 20.0, "b": 5.0}}


@pytest.mark.parametrize(
    ("values", "q", "want"),
    [([1, 2, 3, 4], 0.5, 2.5), ([5], 0.99, 5.0), ([1, 2, 3, 4, 5], 0.99, 4.96), ([], 0.5, None)],
)
def test_percentile_interpolates_like_numpy(
    values: list[int], q: float, want: float | None
) -> None:
    got = stats.percentile(values, q)
    assert got == pytest.approx(want) if want is not None else got is None
    if values:
        assert loadgen.percentile(sorted(values), q) == pytest.approx(want)


def test_median_ignores_missing_values() -> None:
    assert stats.median([3.0, None, 1.0, float("nan"), 2.0]) == 2.0
    assert stats.median([None]) is None


def test_ratio_entry_is_the_median_of_per_round_ratios_with_its_interval() -> None:
    # Round 2 is slow for everyone (a busy machine): pairs cancel it, medians would not.
    e = stats.ratio_entry([90, 45, 95], [100, 50, 100], "direct")
    assert e["vs direct"] == pytest.approx(0.9)
    assert (e["vs direct low"], e["vs direct high"]) == (pytest.approx(0.9), 0.95)
    assert e["vs direct holds"] == pytest.approx(0.75)  # 1 - 2 / 2**3
    assert stats.ratio_entry([1.0, None], [None, 2.0], "x")["vs x"] is None
    assert stats.ratio_entry([1.0], [0.0], "x") == {
        "vs x": None,
        "vs x low": None,
        "vs x high": None,
        "vs x holds": None,
    }


@pytest.mark.parametrize(
    ("n", "k", "holds"),
    [
        (1, 1, 0.0),
        (5, 1, 1 - 2 / 32),  # too few for 95%: the extremes, which hold it with 93.75%
        (6, 1, 1 - 2 / 64),
        (10, 2, 1 - 2 * 11 / 1024),
        (24, 7, 0.977344),  # 1 - 2 P(Binomial(24, 1/2) <= 6)
    ],
)
def test_median_interval_is_the_narrowest_order_statistics_that_hold_95(
    n: int, k: int, holds: float
) -> None:
    values = [float(v) for v in reversed(range(n))]  # any order
    low, high, p = stats.median_interval(values) or (None, None, None)
    assert (low, high) == (k - 1, n - k)
    assert p == pytest.approx(holds, abs=1e-6)
    if k > 1:  # one value further in would hold the median less often than 95%
        closer = 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
        assert closer < 0.95 <= p
    assert stats.median_interval([]) is None


def test_pooled_pairs_rounds_within_each_count() -> None:
    dataplane = {
        "1": {"direct": [_round(10, 1000), _round(10, 2000)], "ebpflb": [_round(9, 900)]},
        "1000": {
            "direct": [_round(10, 1000), _round(10, 1000), _round(10, 1000)],
            "ebpflb": [_round(10, 950), _round(8, 970), _round(10, 990)],
        },
        "50000": {"direct": [_round(10, 1000)]},  # ebpflb skipped there: no pair
    }
    p = stats.pooled(dataplane, "ebpflb", "direct")
    # 900 / 1000 (the 2,000 round has no ebpflb round to pair with), 0.95, 0.97, 0.99
    assert p["conn_per_s"]["rounds"] == 4
    assert p["conn_per_s"]["vs direct"] == pytest.approx(0.96)
    assert (p["conn_per_s"]["vs direct low"], p["conn_per_s"]["vs direct high"]) == (
        pytest.approx(0.9),
        pytest.approx(0.99),
    )
    assert p["gbps"]["vs direct"] == pytest.approx(0.95)


def _round(gbps: float, rate: float, p50_us: float = 900.0) -> dict[str, object]:
    return {
        "throughput": {"gbps": gbps},
        "conn_rate": {"per_second": rate},
        "latency": {"p50_us": p50_us, "p99_us": 5 * p50_us},
    }


def test_summarize_gives_medians_and_ratios_to_each_baseline() -> None:
    rounds = {
        "direct": [_round(10, 1000), _round(12, 1100), _round(11, 900)],
        "ebpflb": [_round(9.6, 950), _round(11.4, 1050), _round(10.6, 880)],
        "iptables-legacy": [_round(9, 500), _round(9, 550), {"throughput": {"error": "x"}}],
    }
    s = stats.summarize(rounds, ["direct", "iptables-legacy"])
    assert s["direct"]["gbps"]["median"] == 11
    assert s["ebpflb"]["conn_per_s"]["vs direct"] == pytest.approx(1050 / 1100)  # middle pair
    assert s["ebpflb"]["conn_per_s"]["vs iptables-legacy"] == pytest.approx(
        (950 / 500 + 1050 / 550) / 2
    )
    assert s["iptables-legacy"]["gbps"]["median"] == 9
    assert s["ebpflb"]["p99_ms"]["median"] == pytest.approx(4.5)


def test_evaluate_judges_every_target() -> None:
    def entry(vs_direct: float, **more: float) -> dict[str, dict[str, float | None]]:
        return {
            "gbps": {"vs direct": vs_direct},
            "conn_per_s": {"vs direct": vs_direct, **{f"vs {k}": v for k, v in more.items()}},
        }

    summary = {
        1: {"ebpflb": entry(0.97)},
        10_000: {"ebpflb": entry(0.95, **{"iptables-legacy": 1.6, "iptables-nft": 2.5})},
    }
    perpacket_median = {
        1: {"conntrack hit": 120.0, "conntrack miss (new flow)": 300.0},
        100_000: {"conntrack hit": 124.0, "conntrack miss (new flow)": 400.0},
    }
    control = {
        "services": 10_000,
        "endpoints": 10,
        "bulk_to_maps_s": 4.0,
        "change_p99_ms": 80.0,
        "agent_hwm_kib": 100_000,
    }
    verdicts = {v.target: v for v in stats.evaluate(summary, perpacket_median, control)}
    met = {k.split(" ")[0] + " " + k.split(" ")[-1]: v.met for k, v in verdicts.items()}
    assert len(verdicts) == 10
    assert verdicts["ebpflb TCP throughput >= 95% of direct"].met is True
    assert verdicts["at 10,000 Services ebpflb conn/s >= 1.5x iptables-legacy"].met is True
    assert verdicts["at 10,000 Services ebpflb conn/s >= 3.0x iptables-nft"].met is False
    assert verdicts["per-packet cost <= 130 ns for an established flow (conntrack hit)"].met is True
    assert (
        verdicts["per-packet cost <= 350 ns for a flow's first packet (conntrack miss)"].met
        is False
    )
    growth = verdicts["per-packet cost at 100,000 Services within 5% of 1 Service"]
    assert growth.met is False and "+33.3%" in growth.measured
    assert verdicts["10,000 Services x 10 endpoints in the maps within 5 s of Apply"].met is True
    assert met  # every target has a verdict
    flat = {1: {"conntrack hit": 100.0}, 100_000: {"conntrack hit": 70.0}}
    noisy = {v.target: v for v in stats.evaluate({}, flat, {})}
    assert noisy["per-packet cost at 100,000 Services within 5% of 1 Service"].met is False
    # the per-round ratios, when the bench gave them, are judged instead of the medians'
    paired = {100_000: {"conntrack hit": 1.02, "conntrack miss (new flow)": 0.97}}
    both = {**flat, 1: {**flat[1], "conntrack miss (new flow)": 1.0}}
    fair = {v.target: v for v in stats.evaluate({}, both, {}, paired)}
    growth = fair["per-packet cost at 100,000 Services within 5% of 1 Service"]
    assert growth.met is True and "+2.0%" in growth.measured and "-3.0%" in growth.measured
    small = dict(control, services=1_000)
    quick = {v.target: v for v in stats.evaluate({}, {}, small)}
    assert quick["agent RSS under 150 MB at 10,000 Services x 10 endpoints"].met is None


def test_a_ratio_target_says_when_the_runs_noise_leaves_it_open() -> None:
    def entry(median: float, low: float, high: float) -> dict[str, dict[str, float | None]]:
        e = {"vs direct": median, "vs direct low": low, "vs direct high": high}
        return {"conn_per_s": {**e, "vs direct holds": 0.97}, "gbps": e}

    def verdict(*cells: tuple[float, float, float]) -> stats.Verdict:
        summary = {10**i: {"ebpflb": entry(*c)} for i, c in enumerate(cells)}
        pooled = {"vs direct": 0.95, "vs direct low": 0.9, "vs direct high": 0.99, "rounds": 24}
        by = {v.target: v for v in stats.evaluate(summary, {}, {}, None, {"conn_per_s": pooled})}
        return by["ebpflb new connections/s >= 93% of direct at every Service count"]

    sure_pass = verdict((0.96, 0.94, 0.99), (0.97, 0.93, 1.0))
    assert (sure_pass.met, sure_pass.within_noise) == (True, False)
    shaky_pass = verdict((0.96, 0.91, 0.99), (0.97, 0.93, 1.0))
    assert (shaky_pass.met, shaky_pass.within_noise) == (True, True)
    shaky_miss = verdict((0.92, 0.85, 0.99), (0.97, 0.93, 1.0))
    assert (shaky_miss.met, shaky_miss.within_noise) == (False, True)
    sure_miss = verdict((0.92, 0.85, 0.99), (0.90, 0.85, 0.92))
    assert (sure_miss.met, sure_miss.within_noise) == (False, False)
    assert "10 Services: 90.0% (85.0%-92.0%)" in sure_miss.measured
    assert "all counts pooled (24 rounds, not judged): 95.0% (90.0%-99.0%)" in sure_miss.measured
    assert "probability 97%" in sure_miss.measured
    # without intervals (a run from before they were kept) nothing is called noise
    bare = {1: {"ebpflb": {"conn_per_s": {"vs direct": 0.92}}}}
    old = {v.target: v for v in stats.evaluate(bare, {}, {})}
    assert not old["ebpflb new connections/s >= 93% of direct at every Service count"].within_noise


def test_batches_stay_under_the_registrys_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    pods = FakePods(groups=4, per_group=1)
    objects = manifests.filler_objects(filler_services(25, pods), pods)
    monkeypatch.setattr(manifests, "BATCH_OBJECTS", 10)
    sizes = [len(b) for b in manifests.batches(objects)]
    assert sizes == [10, 10, 5]
    monkeypatch.setattr(manifests, "BATCH_BYTES", objects[0].ByteSize() * 3 + 30)
    assert all(len(b) <= 3 for b in manifests.batches(objects))
    assert sum(len(b) for b in manifests.batches(objects)) == 25


def test_service_object_asks_for_the_models_vip() -> None:
    pods = FakePods(groups=2, per_group=3)
    svc = filler_services(2, pods)[1]
    obj = manifests.service_object(svc, {"bench-group": "1"})
    assert obj.service.spec.cluster_ip == svc.vip
    assert obj.service.spec.ports[0].target_port.int_val == 80
    assert dict(obj.service.spec.selector) == {"bench-group": "1"}
    pod = manifests.pod_object("p", "10.244.128.2", {"a": "b"}, "node0", ready=False)
    assert pod.pod.status.conditions[0].status == "False"


def test_markdown_report_has_every_section() -> None:
    rounds = {"direct": [_round(10, 1000)], "ebpflb": [_round(9, 950)]}
    results = {
        "meta": {"quick": True, "started": "a", "finished": "b", "kernel": "Linux", "cpus": 2},
        "settings": {"modes": ["direct", "ebpflb", "nftables"], "rounds": 1, "latency_rate": 1e3},
        "modes": {"direct": {}, "ebpflb": {}, "nftables": {}},
        "summary": {"1": stats.summarize(rounds, ["direct"])},
        "skipped": {"1": {"nftables": "installing exceeded the budget"}},
        "perpacket": {
            "rounds": [{}],
            "median": {"1": {"conntrack hit": 120.0}, "1000": {"conntrack hit": 121.0}},
            "ratio_median": {"1000": {"conntrack hit": 1.004}},
        },
        "control": {"ebpflb": {"services": 1000, "endpoints": 10, "bulk_to_maps_s": 1.2}},
        "pooled": {"ebpflb vs direct": stats.pooled({"1": rounds}, "ebpflb", "direct")},
        "targets": [
            {"target": "t", "measured": "m", "met": None},
            {"target": "u", "measured": "n", "met": False, "within_noise": True},
        ],
        "notes": ["a note"],
    }
    text = report.markdown(results)
    for part in ("## Data plane", "### 1 Service\n", "## Per-packet cost", "## Control plane"):
        assert part in text
    assert "*installing exceeded the budget*" in text
    assert "**not measured**: t — m" in text
    assert "| ebpflb | 9.00 | 0.90 |" in text
    assert "| conntrack hit | 1.004 |" in text  # the ratio table
    assert "**MISSED** (within this run's noise): u — n" in text
    assert "### How sure: ebpflb ÷ direct" in text
    assert "| 1 | 0.90 (0.90-0.90, 0%) | 0.95 (0.95-0.95, 0%) |" in text  # one round: no certainty
    assert "| all (1 rounds) |" in text


def test_progress_writes_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(10, out)
    p.say("step one")
    p.advance(5)
    p.say("step two")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("step one") and " 50% " in lines[1] and lines[-1].endswith("done")
    assert not math.isnan(p.done)


def test_a_round_takes_each_step_in_every_mode_before_the_next_back_and_forth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data plane's rounds (runner.Runner._round): step-major, modes backwards in odd rounds,
    a failed throughput run failing only that mode's throughput."""
    calls: list[tuple[str, str]] = []
    fail = [("throughput", "c")] * 2  # c's second iperf3 run fails, once

    def iperf(ns: str, target: object, seconds: float) -> dict[str, float]:
        calls.append(("throughput", ns))
        if fail and calls.count(fail[0]) == len(fail):
            fail.clear()
            raise MeasureError("iperf3 died")
        return {"gbps": float(len(calls)), "retransmits": 1.0}

    def step(name: str) -> Callable[[str, object, LoadSettings], dict[str, str]]:
        def run(ns: str, targets: object, s: LoadSettings) -> dict[str, str]:
            calls.append((name, ns))
            return {"ns": ns}

        return run

    monkeypatch.setattr(measure, "iperf", iperf)
    monkeypatch.setattr(measure, "conn_rate", step("conn_rate"))
    monkeypatch.setattr(measure, "latency", step("latency"))
    plan = Plan.make(False, tmp_path, modes=("a", "b", "c"), parts=("dataplane",))
    runner = Runner(plan)
    runner.modes = {
        n: SimpleNamespace(client_ns=n, iperf_target=lambda: None, http_targets=lambda: [])
        for n in "abc"
    }
    first = runner._round(1, 0, ["a", "b", "c"])
    taken = [("throughput", m) for m in "abcabcab"]  # c's third run skipped: its second failed
    taken += [(step, m) for step in ("conn_rate", "latency") for m in "abc"]
    assert calls == taken
    assert [first[m]["position"] for m in "abc"] == [0, 1, 2]
    assert first["a"]["throughput"]["runs_gbps"] == [1.0, 4.0, 7.0]
    assert first["a"]["throughput"]["gbps"] == pytest.approx(4.0)
    assert first["c"]["throughput"] == {"error": "iperf3 died"}  # its third run was not taken
    assert first["c"]["conn_rate"] == {"ns": "c"} and first["c"]["latency"] == {"ns": "c"}
    calls.clear()
    second = runner._round(1, 1, ["a", "b", "c"])
    assert calls[:3] == [("throughput", m) for m in "cba"]
    assert [second[m]["position"] for m in "cba"] == [0, 1, 2]
    assert second["c"]["throughput"]["runs_gbps"] == [1.0, 4.0, 7.0]  # all three this time
