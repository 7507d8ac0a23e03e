"""Runs the whole benchmark: per-packet cost, control plane, then every mode at every scale."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ebpflb.bench import measure, perpacket, report, stats
from ebpflb.bench.controlplane import ControlSettings, ebpflb_control, netfilter_control
from ebpflb.bench.measure import LoadSettings, MeasureError
from ebpflb.bench.model import EBPFLB_MODES, INTERLEAVE_STEPS, MODES, PARTS
from ebpflb.bench.progress import Progress
from ebpflb.bench.topology import (
    BudgetExceeded,
    EbpflbMode,
    Mode,
    ModeError,
    make_mode,
)
from ebpflb.cluster.cleanup import track, untrack


@dataclass(frozen=True)
class Plan:
    """What one run measures and how long it may take."""

    quick: bool
    out_dir: Path
    json_path: Path
    markdown_path: Path
    plot_path: Path
    modes: tuple[str, ...] = MODES
    scales: tuple[int, ...] = (1, 1_000, 10_000, 50_000)
    rounds: int = 5
    load: LoadSettings = field(default_factory=LoadSettings)
    perpacket_counts: tuple[int, ...] = (1, 1_000, 10_000, 100_000)
    perpacket_rounds: int = 3
    perpacket_repeat: int = 200_000
    control: ControlSettings = field(default_factory=ControlSettings)
    control_netfilter: tuple[str, ...] = ("iptables-legacy", "iptables-nft")
    install_budget: float = 300.0  # seconds one mode may take to install one scale's Services
    parts: tuple[str, ...] = PARTS

    @classmethod
    def make(cls, quick: bool, out_dir: Path, **overrides: Any) -> Plan:
        files = {
            "json_path": out_dir / "results.json",
            "markdown_path": out_dir / "report.md",
            "plot_path": out_dir / "plot.png",
        }
        if quick:
            base: dict[str, Any] = {
                "scales": (1, 1_000),
                "rounds": 3,
                "load": LoadSettings(seconds=0.6, iperf_seconds=1.0, warmup=0.15),
                "perpacket_counts": (1, 1_000, 100_000),
                "perpacket_rounds": 1,
                "perpacket_repeat": 20_000,
                "control": ControlSettings(
                    services=1_000,
                    changes=20,
                    netfilter_full_changes=1,
                    netfilter_partial_changes=2,
                    netfilter_timeout=5.0,
                ),
                "install_budget": 60.0,
            }
        else:
            base = {
                "rounds": 6,  # even: as many rounds forwards as backwards (Runner._round)
                "load": LoadSettings(seconds=1.5, iperf_seconds=1.0, iperf_runs=3),
                "install_budget": 200.0,
                "perpacket_rounds": 2,
                "control": ControlSettings(netfilter_partial_changes=6, netfilter_timeout=60.0),
            }
        base.update(files)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(quick=quick, out_dir=out_dir, **base)

    def weights(self) -> float:
        """Units of work for the progress bar (about a second each, from earlier runs)."""
        total = 0.0
        if "perpacket" in self.parts:
            total += self.perpacket_rounds * self.perpacket_units()
        if "control" in self.parts:
            total += self.control_units() + len(self.control_netfilter) * self.netfilter_units()
        if "dataplane" in self.parts:
            total += 10 * len(self.modes) + 10
            total += len(self.scales) * self.rounds * len(self.modes) * self.round_units()
            total += sum(self.install_units(n) for n in self.scales)
        return total

    def perpacket_units(self) -> float:
        # two datapaths per count, each compiled and filled, then timed together
        return 10 + 2 * sum(8 + n / 20_000 for n in self.perpacket_counts)

    def control_units(self) -> float:
        c = self.control
        return 20 + c.services / 400 + c.changes * (0.05 + c.services / 10_000)

    def netfilter_units(self) -> float:
        c = self.control
        per = c.services / 700  # one full restore
        return per * (1 + c.netfilter_full_changes) + c.netfilter_partial_changes * per / 6

    def round_units(self) -> float:
        iperf = self.load.iperf_runs * (self.load.iperf_seconds + 0.4)
        return iperf + 2 * (self.load.seconds + self.load.warmup) + 1.1

    def install_units(self, services: int) -> float:
        return min(services / 150, self.install_budget)


def judge(results: dict[str, Any]) -> None:
    """(Re)compute the summary of the raw rounds and the targets' verdicts, in place."""
    results["summary"] = {
        k: stats.summarize(v, [b for b in report.BASELINES if b in v])
        for k, v in results.get("dataplane", {}).items()
    }
    summary = {int(k): v for k, v in results["summary"].items()}
    pp = results.get("perpacket", {})
    median = {int(k): v for k, v in pp.get("median", {}).items()}
    ratios = {int(k): v for k, v in pp.get("ratio_median", {}).items()}
    control = results.get("control", {}).get("ebpflb", {})
    dataplane = results.get("dataplane", {})
    results["pooled"] = {"ebpflb vs direct": stats.pooled(dataplane, "ebpflb", "direct")}
    verdicts = stats.evaluate(
        summary,
        median,
        control if isinstance(control, dict) else {},
        ratios,
        results["pooled"]["ebpflb vs direct"],
    )
    results["targets"] = [asdict(v) for v in verdicts]


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [float(f) for f in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)


class Runner:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.progress = Progress(plan.weights())
        self.loads: list[float] = []
        self.modes: dict[str, Mode] = {}
        self.results: dict[str, Any] = {
            "meta": {
                "quick": plan.quick,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "kernel": f"Linux {platform.release()}",
                "cpus": os.cpu_count(),
                "load_start": self._load(),
                "python": platform.python_version(),
            },
            "settings": {
                "modes": list(plan.modes),
                "scales": list(plan.scales),
                "rounds": plan.rounds,
                "interleave": INTERLEAVE_STEPS,
                "latency_rate": plan.load.latency_rate,
                "load": asdict(plan.load),
                "perpacket_counts": list(plan.perpacket_counts),
                "perpacket_rounds": plan.perpacket_rounds,
                "perpacket_repeat": plan.perpacket_repeat,
                "control": {k: str(v) for k, v in asdict(plan.control).items()},
                "install_budget_s": plan.install_budget,
                "parts": list(plan.parts),
            },
            "modes": {},
            "notes": [],
        }

    def _load(self) -> float:
        load = round(os.getloadavg()[0], 2)
        if hasattr(self, "loads"):
            self.loads.append(load)
        return load

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        self.progress.note(f"note: {text}")

    # ------------------------------------------------------------ parts

    def perpacket(self) -> None:
        p = self.plan
        runs: list[perpacket.BenchRun] = []
        try:
            for i in range(p.perpacket_rounds):
                self.progress.say(f"per-packet cost: run {i + 1}/{p.perpacket_rounds}")
                runs.append(perpacket.run_bench(p.perpacket_counts, p.perpacket_repeat))
                self.progress.advance(p.perpacket_units())
                self._load()

            def by_count(tables: list[perpacket.Table]) -> list[dict[str, dict[str, float]]]:
                return [{str(k): v for k, v in t.items()} for t in tables]

            tables, ratios = [r.table for r in runs], [r.ratios for r in runs]
            self.results["perpacket"] = {
                "rounds": by_count(tables),
                "median": by_count([perpacket.median_table(tables)])[0],
                # each count's ratio to the smallest, per run the median of per-round ratios
                "ratio_rounds": by_count(ratios),
                "ratio_median": by_count([perpacket.median_table(ratios)])[0],
            }
        except perpacket.PerPacketError as e:
            self.results["perpacket"] = {"error": str(e)}
            self.note(f"per-packet cost not measured: {e}")

    def control(self) -> None:
        p = self.plan
        out: dict[str, Any] = {}
        self.results["control"] = out
        try:
            out["ebpflb"] = ebpflb_control(p.control, self.progress.say)
        except Exception as e:
            out["ebpflb"] = {"error": f"{type(e).__name__}: {e}"}
            self.note(f"ebpflb control plane failed: {e}\n{traceback.format_exc()}")
        self.progress.advance(p.control_units())
        self._load()
        for flavor in p.control_netfilter:
            try:
                out[flavor] = netfilter_control(flavor, p.control, self.progress.say)
            except Exception as e:
                out[flavor] = {"error": f"{type(e).__name__}: {e}"}
                self.note(f"{flavor} control plane failed: {e}")
            self.progress.advance(p.netfilter_units())
            self._load()

    def _build_modes(self) -> None:
        for name in self.plan.modes:
            self.progress.say(f"data plane: building the {name} cluster")
            try:
                mode = make_mode(name)
                self.modes[name] = mode
                self.results["modes"][name] = {"available": True, "setup": mode.describe()}
            except (ModeError, OSError, RuntimeError) as e:
                self.results["modes"][name] = {"available": False, "error": str(e)}
                self.note(f"mode {name} not available: {e}")
            self.progress.advance(10)

    def _calibrate(self) -> None:
        """The load generator's ceiling: direct's rate with more workers and connections."""
        direct = self.modes.get("direct")
        if direct is None:
            return
        base = self.plan.load
        runs = []
        variants = [(base.procs, base.concurrency), (base.procs + 1, base.concurrency * 2)]
        if not self.plan.quick:
            variants = [(1, base.concurrency // 2), *variants, (base.procs, base.concurrency * 2)]
        for procs, conc in variants:
            self.progress.say(f"load generator ceiling: {procs} workers, {conc} in flight")
            settings = LoadSettings(**{**asdict(base), "procs": procs, "concurrency": conc})
            try:
                r = measure.conn_rate(direct.client_ns, direct.http_targets(), settings)
                runs.append(
                    {
                        "procs": procs,
                        "concurrency": conc,
                        "per_second": r["per_second"],
                        "cpu_cores": r["cpu_cores"],
                        "failed": r["failed"],
                    }
                )
            except MeasureError as e:
                runs.append({"procs": procs, "concurrency": conc, "error": str(e)})
        self.results["calibration"] = runs
        self.progress.advance(10)

    def _round(self, scale: int, n: int, names: list[str]) -> dict[str, dict[str, Any]]:
        """Round n of the data plane at `scale`: each step (every throughput run, then the
        connection rate, then the latency) taken in every mode before the next step, the
        modes in their order in even rounds and backwards in odd ones. A mode's figure and
        the baseline's it is divided by are then taken seconds apart, not a whole mode's turn
        (three steps) apart: the machine's speed drifts over tens of seconds, so the closer
        two figures are, the less of that drift their ratio holds (conn/s of direct and
        ebpflb taken in turn on this VM: per-pair ratios spread 0.089 (sd of the log) for
        neighbours, 0.135 three pairs apart). Going back and forth keeps direct and ebpflb
        next to each other, puts every mode in the middle on average, and makes a drift over
        the round favour each of two neighbours in every other round."""
        load = self.plan.load
        order = list(names) if n % 2 == 0 else names[::-1]

        def iperf(m: Mode) -> dict[str, Any]:
            return dict(measure.iperf(m.client_ns, m.iperf_target(), load.iperf_seconds))

        steps: list[tuple[str, Callable[[Mode], dict[str, Any]]]]
        steps = [("throughput", iperf)] * max(load.iperf_runs, 1)
        steps += [
            ("conn_rate", lambda m: measure.conn_rate(m.client_ns, m.http_targets(), load)),
            ("latency", lambda m: measure.latency(m.client_ns, m.http_targets(), load)),
        ]
        out: dict[str, dict[str, Any]] = {name: {} for name in order}
        iperf_runs: dict[str, list[dict[str, float]]] = {name: [] for name in order}
        spent = {name: [0.0, 0.0, 0.0] for name in order}  # seconds, busy and total jiffies
        step_units = self.plan.round_units() / len(steps)
        for key, fn in steps:
            for name in order:
                self.progress.say(
                    f"data plane: {scale:,} Services, round {n + 1}/{self.plan.rounds}, "
                    f"{key.replace('_', ' ')}, {name}"
                )
                record = out[name]
                busy0, total0 = _cpu_times()
                t0 = time.monotonic()
                if key not in record:  # a failed throughput run fails the round's throughput
                    try:
                        figures = fn(self.modes[name])
                    except (MeasureError, OSError, subprocess.SubprocessError) as e:
                        record[key] = {"error": str(e)}
                    else:
                        if key == "throughput":
                            iperf_runs[name].append(figures)
                        else:
                            record[key] = figures
                busy1, total1 = _cpu_times()
                used = spent[name]
                used[0] += time.monotonic() - t0
                used[1] += busy1 - busy0
                used[2] += total1 - total0
                self.progress.advance(step_units)
        load_avg = self._load()
        rounds: dict[str, dict[str, Any]] = {}
        for position, name in enumerate(order):
            record = out[name]
            seconds, busy, total = spent[name]
            rounds[name] = {
                "throughput": record.get("throughput") or measure.throughput_of(iperf_runs[name]),
                "conn_rate": record["conn_rate"],
                "latency": record["latency"],
                "seconds": seconds,
                "cpu_busy": busy / max(total, 1.0),
                "load": load_avg,
                "position": position,
            }
        return rounds

    def dataplane(self) -> None:
        p = self.plan
        dataplane: dict[str, dict[str, list[dict[str, Any]]]] = {}
        skipped: dict[str, dict[str, str]] = {}
        memory: dict[str, Any] = {}
        live: dict[str, Any] = {}
        self.results.update(dataplane=dataplane, skipped=skipped, memory=memory, live_bpf=live)
        self._build_modes()
        self._calibrate()
        gone: dict[str, str] = {}
        for scale in p.scales:
            key = str(scale)
            dataplane[key] = {}
            skipped[key] = dict(gone)
            for name, mode in self.modes.items():
                if name in gone:
                    continue
                self.progress.say(f"data plane: installing {scale:,} Services ({name})")
                try:
                    info = mode.install(scale, p.install_budget)
                    self.results["modes"][name].setdefault("installs", []).append(info)
                except (ModeError, OSError, RuntimeError) as e:
                    why = (
                        f"installing {scale:,} Services exceeded the budget"
                        if isinstance(e, BudgetExceeded)
                        else "failed"
                    )
                    gone[name] = why
                    skipped[key][name] = why
                    self.note(f"{name} at {scale:,} Services: {e} (skipped from here on)")
                self.progress.advance(p.install_units(scale) / len(self.modes))
            active = [n for n in self.modes if n not in gone]
            for r in range(p.rounds):
                for name, record in self._round(scale, r, active).items():
                    dataplane[key].setdefault(name, []).append(record)
            for name in EBPFLB_MODES:
                eb = self.modes.get(name)
                if not isinstance(eb, EbpflbMode) or name in gone:
                    continue
                memory.setdefault(key, {})[name] = eb.memory()
                self.progress.say(f"data plane: {scale:,} Services, {name}'s programs in traffic")
                try:
                    live.setdefault(key, {})[name] = measure.live_program_cost(
                        eb.program_ids(), eb.client_ns, eb.http_targets(), p.load
                    )
                except (MeasureError, OSError, subprocess.SubprocessError) as e:
                    live.setdefault(key, {})[name] = {"error": str(e)}
        errors = [
            f"{scale} {mode} round {i + 1} {part}: {rec[part]['error']}"
            for scale, modes in dataplane.items()
            for mode, recs in modes.items()
            for i, rec in enumerate(recs)
            for part in ("throughput", "conn_rate", "latency")
            if isinstance(rec.get(part), dict) and "error" in rec[part]
        ]
        for line in errors[:20]:
            self.note(line)

    # ------------------------------------------------------------ all

    def close_modes(self) -> None:
        for name in list(self.modes):
            mode = self.modes.pop(name)
            self.progress.say(f"removing the {name} cluster")
            try:
                mode.close()
            except Exception as e:  # keep removing the others
                self.results["notes"].append(f"closing {name}: {e}")

    def close(self) -> None:
        """At exit or on SIGTERM (through the cluster module's hooks)."""
        self.close_modes()

    def run(self) -> dict[str, Any]:
        track(self)
        try:
            for part, fn in (
                ("perpacket", self.perpacket),
                ("control", self.control),
                ("dataplane", self.dataplane),
            ):
                if part in self.plan.parts:
                    fn()
        finally:
            self.close_modes()
            untrack(self)
        meta = self.results["meta"]
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        meta["load_end"] = self._load()
        meta["load_max"] = max(self.loads) if self.loads else None
        meta["seconds"] = round(time.monotonic() - self.progress.started, 1)
        judge(self.results)
        return self.results

    def write(self) -> list[str]:
        """Write the report, the JSON and the plot; the paths written (and why a plot is not)."""
        p = self.plan
        return write_all(self.results, p.markdown_path, p.json_path, p.plot_path)


def write_all(results: dict[str, Any], markdown: Path, json_path: Path, plot: Path) -> list[str]:
    report.write_json(results, json_path)
    markdown.write_text(report.markdown(results))
    written = [str(markdown), str(json_path)]
    why = None
    with contextlib.suppress(Exception):
        why = report.plot(results, plot)
        if why is None:
            written.append(str(plot))
    if why:
        written.append(why)
    return written
