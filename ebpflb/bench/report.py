"""The benchmark's outputs: a markdown report, the raw rounds as JSON, a PNG plot."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ebpflb.bench.model import INTERLEAVE_STEPS
from ebpflb.bench.stats import METRICS

BASELINES = ("direct", "iptables-legacy", "iptables-nft")
SHORT = {"direct": "direct", "iptables-legacy": "ipt-legacy", "iptables-nft": "ipt-nft"}
PLOT_PATHS = ("conntrack hit", "conntrack miss (new flow)", "reverse NAT", "no service")


def _num(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:{spec}}"


def _ratio(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def dataplane_table(
    summary: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    modes: Sequence[str],
    skipped: Mapping[str, str],
) -> str:
    """One row per mode: each figure's median and its ratio to each baseline run."""
    present = [b for b in BASELINES if b in summary]
    header = ["mode"]
    for metric, (label, unit, _) in METRICS.items():
        header.append(f"{label} ({unit})")
        header += [f"÷{SHORT[b]}" for b in present if metric in ("gbps", "conn_per_s", "p99_ms")]
    rows = []
    for mode in modes:
        if mode not in summary:
            reason = skipped.get(mode, "not measured")
            rows.append([mode, f"*{reason}*"] + [""] * (len(header) - 2))
            continue
        row = [mode]
        kept_up = summary[mode].get("kept_up", {}).get("median")
        behind = kept_up is not None and kept_up < 0.95
        for metric in METRICS:
            entry = summary[mode].get(metric, {})
            spec = ".2f" if metric == "gbps" else ".0f" if metric == "conn_per_s" else ".2f"
            value = _num(entry.get("median"), spec)
            if behind and metric in ("p50_ms", "p99_ms"):
                value += " †"
            row.append(value)
            if metric in ("gbps", "conn_per_s", "p99_ms"):
                row += [_ratio(entry.get(f"vs {b}")) for b in present]
        rows.append(row)
    return _table(header, rows)


def perpacket_table(
    median: Mapping[str, Mapping[str, float]],
    title: str = "ns per packet (minus an empty program)",
    spec: str = ".0f",
) -> str:
    counts = sorted(median, key=int)
    paths: list[str] = []
    for c in counts:
        paths += [p for p in median[c] if p not in paths]
    header = [title] + [f"{int(c):,}" for c in counts]
    rows = [[p] + [_num(median[c].get(p), spec) for c in counts] for p in paths]
    return _table(header, rows)


def _ms(v: Any) -> str:
    return _num(v, ".1f")


def control_table(control: Mapping[str, Mapping[str, Any]]) -> str:
    eb = control.get("ebpflb", {})
    legacy = control.get("iptables-legacy", {})
    nft = control.get("iptables-nft", {})

    def sync(d: Mapping[str, Any], kind: str, key: str) -> str:
        s = d.get(f"{kind}_sync")
        if not isinstance(s, Mapping):
            return "–"
        text = _ms(s.get(key))
        if s.get("timed_out"):
            text = f"> {d.get('timeout_s', 0) * 1000:.0f} (timed out)" if not s.get("n") else text
        return f"{text} (n={s.get('n', 0)})"

    def secs(v: Any) -> str:
        return "timed out" if v is None else _num(v, ".2f")

    change = eb.get("change", {}) if isinstance(eb.get("change"), Mapping) else {}
    rpc = eb.get("change_apply_rpc", {}) if isinstance(eb.get("change_apply_rpc"), Mapping) else {}
    size = eb.get("services") or legacy.get("services")
    eps = eb.get("endpoints") or legacy.get("endpoints")
    rows = [
        [
            f"{size:,} Services x {eps} endpoints: Apply/restore -> all in the kernel (s)"
            if isinstance(size, int)
            else "bulk (s)",
            secs(eb.get("bulk_to_maps_s")) if eb else "–",
            secs(legacy.get("bulk_s")) if legacy else "–",
            secs(nft.get("bulk_s")) if nft else "–",
        ],
        [
            "  of which the Apply RPC (s)",
            _num(eb.get("bulk_apply_rpc_s"), ".2f"),
            "",
            "",
        ],
        [
            "one endpoint change -> kernel, p50 (ms)",
            f"{_ms(change.get('p50_ms'))} (n={change.get('n', 0)})" if change else "–",
            f"full {sync(legacy, 'full', 'p50_ms')}; partial {sync(legacy, 'partial', 'p50_ms')}"
            if legacy
            else "–",
            f"full {sync(nft, 'full', 'p50_ms')}; partial {sync(nft, 'partial', 'p50_ms')}"
            if nft
            else "–",
        ],
        [
            "one endpoint change -> kernel, p99 (ms)",
            _ms(change.get("p99_ms")),
            f"full {sync(legacy, 'full', 'p99_ms')}; partial {sync(legacy, 'partial', 'p99_ms')}"
            if legacy
            else "–",
            f"full {sync(nft, 'full', 'p99_ms')}; partial {sync(nft, 'partial', 'p99_ms')}"
            if nft
            else "–",
        ],
        [
            "  of which the Apply RPC, p50 / p99 (ms)",
            f"{_ms(rpc.get('p50_ms'))} / {_ms(rpc.get('p99_ms'))}" if rpc else "–",
            "",
            "",
        ],
        [
            "rules / map entries",
            f"{eb.get('frontends_in_maps', '–')} frontends",
            f"{legacy.get('rules', '–')} rules",
            f"{nft.get('rules', '–')} rules",
        ],
    ]
    return _table(["control plane", "ebpflb", "iptables-legacy", "iptables-nft"], rows)


def live_table(live: Mapping[str, Any]) -> str:
    """ns per run of each program during a connection-rate run, and runs per connection, for
    each ebpflb mode."""
    rows = []
    for scale in sorted(live, key=int):
        for mode, entry in live[scale].items():
            if not isinstance(entry, Mapping):
                continue
            if "error" in entry:
                rows.append([f"{int(scale):,}", mode, f"*{entry['error']}*", "", "", ""])
                continue
            for name, v in entry.items():
                if not isinstance(v, Mapping):
                    continue
                rows.append(
                    [
                        f"{int(scale):,}",
                        mode,
                        name,
                        _num(v.get("ns_per_run"), ".0f"),
                        _num(v.get("runs_per_connection"), ".1f"),
                        _num((v.get("ns_per_connection") or 0) / 1000, ".2f"),
                    ]
                )
    return _table(
        ["Services", "mode", "program", "ns per run", "runs per connection", "µs per connection"],
        rows,
        3,
    )


def _kib(d: Any, key: str) -> str:
    if not isinstance(d, Mapping) or d.get(key) is None:
        return "–"
    return f"{d[key] / 1024:.0f}"


def memory_table(control: Mapping[str, Any], dataplane_memory: Mapping[str, Any]) -> str:
    rows = []
    eb = control.get("ebpflb")
    if isinstance(eb, Mapping) and "agent_kib" in eb:
        label = f"{eb.get('services', 0):,} Services x {eb.get('endpoints')} (control-plane test)"
        rows.append(
            [
                label,
                _kib(eb.get("agent_before_kib"), "VmHWM"),
                _kib(eb.get("agent_kib"), "VmHWM"),
                _kib(eb.get("registry_kib"), "VmHWM"),
            ]
        )
    for scale, modes in sorted(dataplane_memory.items(), key=lambda kv: int(kv[0])):
        for mode, mem in modes.items():
            agent = next((v for k, v in mem.items() if k.startswith("agent")), None)
            rows.append(
                [
                    f"{int(scale):,} Service{'' if int(scale) == 1 else 's'} x 1 ({mode} cluster)",
                    "",
                    _kib(agent, "VmHWM"),
                    _kib(mem.get("registry"), "VmHWM"),
                ]
            )
    return _table(
        [
            "ebpflb processes",
            "agent at start (MiB)",
            "agent peak RSS (MiB)",
            "registry peak RSS (MiB)",
        ],
        rows,
    )


def targets_list(targets: Sequence[Mapping[str, Any]]) -> str:
    mark = {True: "MET", False: "MISSED", None: "not measured"}
    noise = " (within this run's noise)"
    return "\n".join(
        f"- **{mark[t['met']]}**{noise if t.get('within_noise') else ''}: "
        f"{t['target']} — {t['measured']}"
        for t in targets
    )


def _with_interval(e: Mapping[str, Any], base: str) -> str:
    value = _ratio(e.get(f"vs {base}"))
    low, high = e.get(f"vs {base} low"), e.get(f"vs {base} high")
    if low is None or high is None:
        return value
    return f"{value} ({low:.2f}-{high:.2f}, {e.get(f'vs {base} holds', 0) * 100:.0f}%)"


def certainty_table(
    summary: Mapping[str, Mapping[str, Any]], pooled: Mapping[str, Mapping[str, Any]]
) -> str:
    """ebpflb ÷ direct per count and over all counts' rounds, each with its interval."""
    metrics = ("gbps", "conn_per_s")
    rows = [
        [f"{int(k):,}"]
        + [_with_interval(summary[k]["ebpflb"].get(m, {}), "direct") for m in metrics]
        for k in sorted(summary, key=int)
        if "ebpflb" in summary[k]
    ]
    if pooled:
        n = int(pooled.get("conn_per_s", {}).get("rounds") or 0)
        rows.append(
            [f"all ({n} rounds)"] + [_with_interval(pooled.get(m, {}), "direct") for m in metrics]
        )
    return _table(["Services", "TCP throughput ÷direct", "new connections ÷direct"], rows)


def markdown(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    out = [
        f"# ebpflb bench ({'quick' if meta.get('quick') else 'full'} run)",
        "",
        f"{meta.get('started')} → {meta.get('finished')}; {meta.get('kernel')}, "
        f"{meta.get('cpus')} CPUs; load average at start {meta.get('load_start')}, "
        f"at end {meta.get('load_end')}, max seen {meta.get('load_max')}.",
        "",
    ]
    modes = results.get("modes", {})
    order = [m for m in results.get("settings", {}).get("modes", []) if m in modes]
    summary = results.get("summary", {})
    skipped = results.get("skipped", {})
    settings = results.get("settings", {})
    load = settings.get("load", {})
    if summary:
        if settings.get("interleave") == INTERLEAVE_STEPS:
            interleave = (
                f"modes {', '.join(order)} in even rounds and backwards in odd ones; each step "
                "(every throughput run, the connection rate, the latency) taken in every mode "
                "before the next, so a figure and the baseline's it is divided by are seconds "
                "apart"
            )
        else:  # runs before 2026-11-30 took a mode's three steps in a row
            interleave = f"modes in turn: {', '.join(order)}"
        out += [
            "## Data plane",
            "",
            f"Median of {settings.get('rounds')} interleaved rounds per figure ({interleave}); "
            "each ÷ column is the median over rounds of the mode's figure "
            "divided by that baseline's figure in the same round. Throughput: one TCP stream, "
            f"the mean of {load.get('iperf_runs', 1)} iperf3 runs of "
            f"{load.get('iperf_seconds')} s in each round. Latency: new connection + "
            f"one request at {settings.get('latency_rate')} connections/s, counted from when "
            "each was due. Services installed include the 2 measured ones (HTTP, iperf3), "
            "last in kube-proxy's KUBE-SERVICES chain.",
            "",
        ]
        for scale in sorted(summary, key=int):
            n = int(scale)
            out += [f"### {n:,} Service{'s' if n != 1 else ''}", ""]
            out.append(dataplane_table(summary[scale], order, skipped.get(scale, {})))
            out.append("")
        out += [
            "† the mode could not keep up with the fixed rate (under 95% of it completed in "
            "time): its latency is mostly queueing.",
            "",
        ]
        pooled = results.get("pooled", {}).get("ebpflb vs direct", {})
        if any("ebpflb" in v for v in summary.values()):
            out += [
                "### How sure: ebpflb ÷ direct",
                "",
                "The median of the per-round ratios, and in brackets an interval that holds the "
                "true median ratio (what endless rounds would give) with the probability shown, "
                "whatever the ratios' distribution: the k-th smallest and k-th largest of n "
                "rounds. The last row pools the rounds of every count, which the per-packet "
                "cost (flat from 1 to 100,000 Services) allows.",
                "",
                certainty_table(summary, pooled),
                "",
            ]
    pp = results.get("perpacket", {})
    if pp.get("median"):
        out += [
            "## Per-packet cost (BPF_PROG_TEST_RUN)",
            "",
            f"`python -m ebpflb.datapath.bench`, median of {len(pp.get('rounds', []))} runs; "
            "in each run every Service count has datapaths of its own (two) and the counts are "
            "timed in interleaved rounds.",
            "",
            perpacket_table(pp["median"]),
            "",
        ]
        if pp.get("ratio_median"):
            first = min(map(int, pp["median"]))
            out += [
                perpacket_table(
                    pp["ratio_median"], f"ratio to {first:,} (median of per-round ratios)", ".3f"
                ),
                "",
            ]
    elif pp.get("error"):
        out += ["## Per-packet cost", "", f"failed: {pp['error']}", ""]
    control = results.get("control", {})
    if control:
        out += ["## Control plane", "", control_table(control), ""]
        for name, c in control.items():
            if isinstance(c, Mapping) and c.get("error"):
                out.append(f"- {name}: failed: {c['error']}")
        out.append("")
    live = results.get("live_bpf", {})
    if live:
        out += ["## ebpflb's programs in real traffic (kernel.bpf_stats_enabled)", ""]
        out.append(live_table(live))
        out.append("")
    mem_table = memory_table(control, results.get("memory", {}))
    out += ["## Memory", "", mem_table, ""]
    if results.get("targets"):
        out += ["## Targets", "", targets_list(results["targets"]), ""]
    notes = results.get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False, default=str) + "\n")


def _axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Both plots: Service count on a log scale against a figure from 0."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)


def plot(results: Mapping[str, Any], path: Path) -> str | None:
    """Connection rate and per-packet cost against Service count; None when written, else why
    not (matplotlib is optional)."""
    try:
        # Imported by name: matplotlib is optional, and mypy must pass without it.
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    summary = results.get("summary", {})
    order = [m for m in results.get("settings", {}).get("modes", [])]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in order:
        xs, ys = [], []
        for scale in sorted(summary, key=int):
            v = summary[scale].get(mode, {}).get("conn_per_s", {}).get("median")
            if v is not None:
                xs.append(int(scale))
                ys.append(v)
        if xs:
            ax1.plot(xs, ys, marker="o", label=mode)
    _axes(
        ax1,
        "Services installed",
        "new connections per second",
        "Connection rate (one request per connection)",
    )
    if summary:
        ax1.legend()
    median = results.get("perpacket", {}).get("median", {})
    counts = sorted(median, key=int)
    for p in PLOT_PATHS:
        xs = [int(c) for c in counts if p in median[c]]
        ys = [median[c][p] for c in counts if p in median[c]]
        if xs:
            ax2.plot(xs, ys, marker="o", label=f"ebpflb: {p}")
    _axes(ax2, "Services in the maps", "ns per packet", "Per-packet cost (BPF_PROG_TEST_RUN)")
    if counts:
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "not measured", ha="center", transform=ax2.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
