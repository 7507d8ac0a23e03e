"""Medians, percentiles and ratios of benchmark rounds, and the targets they are judged against."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Number = float | int

# One figure of the data plane: its key in a round's record, how it reads, which way is better.
METRICS: dict[str, tuple[str, str, bool]] = {
    "gbps": ("TCP throughput", "Gbit/s", True),
    "conn_per_s": ("new connections", "conn/s", True),
    "p50_ms": ("latency p50", "ms", False),
    "p99_ms": ("latency p99", "ms", False),
}


def median(values: Sequence[Number | None]) -> float | None:
    """Median of the values that are not None or NaN; None if there are none."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(clean) if clean else None


def percentile(values: Sequence[Number], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(float(v) for v in values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ratios(a: Sequence[Number | None], b: Sequence[Number | None]) -> list[float]:
    """a[i] / b[i] for every round where both were measured (and b[i] is not 0)."""
    return [
        float(x) / float(y)
        for x, y in zip(a, b, strict=False)
        if x is not None and y is not None and float(y) != 0.0 and not math.isnan(float(x))
    ]


CONFIDENCE = 0.95


def median_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float] | None:
    """An interval for the median that assumes nothing of the values' distribution: the k-th
    smallest and the k-th largest of n values hold the median with probability
    1 - 2 P(Binomial(n, 1/2) < k). The narrowest such interval holding it with at least
    `confidence`; with too few values for that (5 or fewer for 95%), the smallest and the
    largest value. Returns (low, high, the probability it holds the median)."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        return None

    def holds(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / (1 << n)

    k = 1
    while 2 * (k + 1) <= n + 1 and holds(k + 1) >= confidence:
        k += 1
    return s[k - 1], s[n - k], holds(k)


def round_figures(record: Mapping[str, object]) -> dict[str, float | None]:
    """The figures of one mode's round, from the raw record the runner keeps."""

    def get(section: str, key: str, scale: float = 1.0) -> float | None:
        part = record.get(section)
        if not isinstance(part, Mapping) or part.get(key) is None:
            return None
        value = float(part[key])
        return None if math.isnan(value) else value * scale

    lat = record.get("latency")
    kept_up = None
    if isinstance(lat, Mapping) and lat.get("rate") and lat.get("achieved_per_second") is not None:
        kept_up = float(lat["achieved_per_second"]) / float(lat["rate"])
    return {
        "gbps": get("throughput", "gbps"),
        "conn_per_s": get("conn_rate", "per_second"),
        "p50_ms": get("latency", "p50_us", 1e-3),
        "p99_ms": get("latency", "p99_us", 1e-3),
        "kept_up": kept_up,
    }


def ratio_entry(
    a: Sequence[Number | None], b: Sequence[Number | None], base: str
) -> dict[str, float | None]:
    """The ratio of a to b: under "vs base" the median over rounds of a[i] / b[i] (the
    rounds are interleaved, so each pair was measured seconds apart and shares the
    machine's speed of the moment); under "vs base low", "high" and "holds" its interval
    (median_interval) and how likely that holds the true median."""
    r = ratios(a, b)
    interval = median_interval(r)
    low, high, holds = interval if interval else (None, None, None)
    return {
        f"vs {base}": median(r),
        f"vs {base} low": low,
        f"vs {base} high": high,
        f"vs {base} holds": holds,
    }


def pooled(
    dataplane: Mapping[str, Mapping[str, Sequence[Mapping[str, object]]]], mode: str, base: str
) -> dict[str, dict[str, float | None]]:
    """metric -> ratio_entry of mode to base over the rounds of every Service count: what
    the per-count figures would be if the ratio does not depend on the count (the
    datapath's per-packet cost does not), from as many rounds as all counts together."""
    pairs = [  # round i with round i of the same count
        (round_figures(x), round_figures(y))
        for rounds in dataplane.values()
        if mode in rounds and base in rounds
        for x, y in zip(rounds[mode], rounds[base], strict=False)
    ]
    out: dict[str, dict[str, float | None]] = {}
    for metric in METRICS:
        a = [x[metric] for x, _ in pairs]
        b = [y[metric] for _, y in pairs]
        entry = ratio_entry(a, b, base)
        entry["rounds"] = float(len(ratios(a, b)))
        out[metric] = entry
    return out


def summarize(
    rounds: Mapping[str, Sequence[Mapping[str, object]]], baselines: Sequence[str]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """mode -> metric -> {"median", "vs <baseline>"...} for one Service count."""
    figures = {m: [round_figures(r) for r in rs] for m, rs in rounds.items()}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for mode, recs in figures.items():
        out[mode] = {}
        for metric in METRICS:
            values = [r[metric] for r in recs]
            entry: dict[str, float | None] = {"median": median(values), "rounds": len(values)}
            for base in baselines:
                if base in figures:
                    entry.update(ratio_entry(values, [r[metric] for r in figures[base]], base))
            out[mode][metric] = entry
        out[mode]["kept_up"] = {"median": median([r["kept_up"] for r in recs])}
    return out


@dataclass(frozen=True)
class Verdict:
    """One target: what it asks, what was measured, and whether it is met (None: not measured).
    within_noise: the run's intervals leave the verdict open (a median met the bound but an
    interval reaches under it, or every median that missed has an interval reaching it)."""

    target: str
    measured: str
    met: bool | None
    within_noise: bool = False


def _fmt(v: float | None, spec: str = ".3g", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def _pct(v: float | None) -> str:
    return _fmt(None if v is None else v * 100, ".1f", "%")


def _times(v: float | None) -> str:
    return _fmt(v, ".2f", "x")


def _ns(v: float | None) -> str:
    return _fmt(v, ".0f", " ns")


def _secs(v: float | None) -> str:
    return _fmt(v, ".2f", " s")


def _ms(v: float | None) -> str:
    return _fmt(v, ".1f", " ms")


def _growth(v: float | None) -> str:
    return _fmt(None if v is None else v * 100, "+.1f", "%")


def _mb(v: float | None) -> str:
    return _fmt(v, ".0f", " MB")


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda v: v >= bound


def _at_most(bound: float) -> Callable[[float], bool]:
    return lambda v: v <= bound


def _check(
    target: str,
    values: Sequence[tuple[str, float | None]],
    ok: Callable[[float], bool],
    fmt: Callable[[float | None], str],
) -> Verdict:
    """Met when every labelled value is measured and ok."""
    measured = ", ".join(f"{label}: {fmt(v)}" for label, v in values) or "not measured"
    known = [v for _, v in values if v is not None]
    if not known:
        return Verdict(target, measured, None)
    return Verdict(target, measured, all(ok(v) for v in known) and len(known) == len(values))


def _services(n: int) -> str:
    return f"{n:,} Service{'' if n == 1 else 's'}"


def _check_vs_direct(
    target: str,
    entries: Sequence[tuple[str, Mapping[str, float | None]]],
    bound: float,
    pooled_entry: Mapping[str, float | None] | None,
) -> Verdict:
    """A ratio to direct of at least `bound` at every count, each with its interval; the
    figure over all counts' rounds (pooled) is shown, not judged."""
    verdict = _check(target, [(k, e.get("vs direct")) for k, e in entries], _at_least(bound), _pct)

    def interval(e: Mapping[str, float | None]) -> str:
        low, high = e.get("vs direct low"), e.get("vs direct high")
        return "" if low is None or high is None else f" ({_pct(low)}-{_pct(high)})"

    parts = [f"{k}: {_pct(e.get('vs direct'))}{interval(e)}" for k, e in entries]
    holds = sorted({round(h * 100) for _, e in entries if (h := e.get("vs direct holds"))})
    if pooled_entry and pooled_entry.get("vs direct") is not None:
        rounds = int(pooled_entry.get("rounds") or 0)
        parts.append(
            f"all counts pooled ({rounds} rounds, not judged): "
            f"{_pct(pooled_entry.get('vs direct'))}{interval(pooled_entry)}"
        )
        if h := pooled_entry.get("vs direct holds"):
            holds.append(round(h * 100))
    measured = ", ".join(parts) or "not measured"
    if holds:
        sure = "/".join(f"{h}%" for h in holds)
        measured += f"; each interval holds the true median ratio with probability {sure}"
    if verdict.met is None:
        return Verdict(target, measured, None)
    lows, highs = [], []
    for _, e in entries:
        low, high = e.get("vs direct low"), e.get("vs direct high")
        if low is None or high is None:
            return Verdict(target, measured, verdict.met)  # no interval: not a noise call
        lows.append(low)
        highs.append(high)
    # a pass every interval confirms, or a miss some interval confirms, is not noise
    decided = min(lows) >= bound if verdict.met else min(highs) < bound
    return Verdict(target, measured, verdict.met, not decided)


def evaluate(
    summary: Mapping[int, Mapping[str, Mapping[str, Mapping[str, float | None]]]],
    perpacket: Mapping[int, Mapping[str, float]],
    control: Mapping[str, object],
    perpacket_ratios: Mapping[int, Mapping[str, float]] | None = None,
    pooled_direct: Mapping[str, Mapping[str, float | None]] | None = None,
) -> list[Verdict]:
    """Every target of the issue, against what this run measured. perpacket_ratios: each
    Service count's per-packet cost as a ratio to the smallest count's, taken round by round
    (the datapath bench's ratio table); without it the medians' ratio is used. pooled_direct:
    ebpflb's ratios to direct over every count's rounds (pooled), shown beside the counts'."""
    scales = sorted(summary)

    def ratio(scale: int, metric: str, base: str) -> float | None:
        return summary[scale].get("ebpflb", {}).get(metric, {}).get(f"vs {base}")

    def entries(metric: str) -> list[tuple[str, Mapping[str, float | None]]]:
        return [(_services(n), summary[n].get("ebpflb", {}).get(metric, {})) for n in scales]

    pool = pooled_direct or {}
    out = [
        _check_vs_direct(
            "ebpflb TCP throughput >= 95% of direct", entries("gbps"), 0.95, pool.get("gbps")
        ),
        _check_vs_direct(
            "ebpflb new connections/s >= 93% of direct at every Service count",
            entries("conn_per_s"),
            0.93,
            pool.get("conn_per_s"),
        ),
    ]
    at = 10_000
    for base, factor in (("iptables-legacy", 1.5), ("iptables-nft", 3.0)):
        out.append(
            _check(
                f"at 10,000 Services ebpflb conn/s >= {factor}x {base}",
                [(f"{at:,} Services", ratio(at, "conn_per_s", base) if at in summary else None)],
                _at_least(factor),
                _times,
            )
        )
    hit, miss = "conntrack hit", "conntrack miss (new flow)"
    counts = sorted(perpacket)
    out.append(
        _check(
            "per-packet cost <= 130 ns for an established flow (conntrack hit)",
            [(f"{n:,}", perpacket[n].get(hit)) for n in counts],
            _at_most(130),
            _ns,
        )
    )
    out.append(
        _check(
            "per-packet cost <= 350 ns for a flow's first packet (conntrack miss)",
            [(f"{n:,}", perpacket[n].get(miss)) for n in counts],
            _at_most(350),
            _ns,
        )
    )
    growth: list[tuple[str, float | None]] = []
    if 1 in perpacket and 100_000 in perpacket:
        paired = (perpacket_ratios or {}).get(100_000, {}) if min(perpacket) == 1 else {}
        for path in (hit, miss):
            a, b = perpacket[1].get(path), perpacket[100_000].get(path)
            r = paired.get(path)
            if r is None and a is not None and b is not None and a > 0:
                r = b / a
            growth.append((path, None if r is None else r - 1))
    out.append(
        _check(
            "per-packet cost at 100,000 Services within 5% of 1 Service",
            growth,
            lambda v: abs(v) <= 0.05,  # a drop as large is noise, not a pass
            _growth,
        )
    )
    size = control.get("services")
    label = f"{size:,} x {control.get('endpoints')}" if isinstance(size, int) else "n/a"
    full = size == 10_000
    bulk = control.get("bulk_to_maps_s")
    out.append(
        _check(
            "10,000 Services x 10 endpoints in the maps within 5 s of Apply",
            [(label, float(bulk) if isinstance(bulk, int | float) and full else None)],
            _at_most(5.0),
            _secs,
        )
    )
    p99 = control.get("change_p99_ms")
    out.append(
        _check(
            "one endpoint change in the maps within 50 ms p99 (at 10,000 Services)",
            [(label, float(p99) if isinstance(p99, int | float) and full else None)],
            _at_most(50.0),
            _ms,
        )
    )
    rss = control.get("agent_hwm_kib")
    out.append(
        _check(
            "agent RSS under 150 MB at 10,000 Services x 10 endpoints",
            [(label, float(rss) * 1024 / 1e6 if isinstance(rss, int | float) and full else None)],
            lambda v: v < 150.0,
            _mb,
        )
    )
    return out
