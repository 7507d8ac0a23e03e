"""`ebpflb bench`: its flags and what it does, in the shape of ebpflb.cli's Command table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from ebpflb.bench.model import MODES, PARTS


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x.replace("_", "")) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"give positive numbers: {text}")
    return values


def _names(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x for x in text.split(",") if x)
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (not {text})")
        return names

    return parse


def arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `ebpflb bench`."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in under 3 minutes: scales 1 and 1,000, 3 short rounds, "
        "control plane at 1,000 Services",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="where report.md, results.json and plot.png go (default /tmp/ebpflb-bench-<time>)",
    )
    p.add_argument("--json", metavar="FILE", type=Path, help="the raw rounds as JSON here")
    p.add_argument("--plot", metavar="FILE", type=Path, help="the PNG plot here")
    p.add_argument("--markdown", metavar="FILE", type=Path, help="the report here")
    p.add_argument(
        "--modes",
        type=_names(MODES),
        metavar="LIST",
        help=f"comma-separated, from {','.join(MODES)} (default all)",
    )
    p.add_argument(
        "--scales", type=_ints, metavar="LIST", help="Service counts (default 1,1000,10000,50000)"
    )
    p.add_argument("--rounds", type=int, metavar="N", help="rounds per figure (default 6; quick 3)")
    p.add_argument(
        "--only",
        type=_names(PARTS),
        metavar="LIST",
        help=f"run only these parts: {','.join(PARTS)}",
    )
    p.add_argument(
        "--from-json",
        metavar="FILE",
        type=Path,
        help="measure nothing: redo the report, targets and plot of an earlier run's JSON",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the agent and the registry during the control-plane test (into --out)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the clusters, measure, print the report; 0 once it ran (targets are in the
    report), 1 if it could not run."""
    if args.from_json is not None:
        return _rereport(args)
    if os.geteuid() != 0:
        print("error: ebpflb bench needs root (namespaces, BPF, iptables)", file=sys.stderr)
        return 1
    # The heavy modules (clusters, bcc through the harness) only when a run starts, so that
    # building the CLI's parser stays cheap.
    from ebpflb.bench.report import markdown
    from ebpflb.bench.runner import Plan, Runner

    out = args.out or Path(f"/tmp/ebpflb-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.make(
        args.quick,
        out,
        modes=args.modes,
        scales=args.scales,
        rounds=args.rounds,
        parts=args.only,
        json_path=args.json,
        plot_path=args.plot,
        markdown_path=args.markdown,
    )
    if args.profile:
        plan = replace(plan, control=replace(plan.control, profile_dir=out / "profiles"))
    runner = Runner(plan)
    try:
        runner.run()
    finally:
        runner.progress.close()
    written = runner.write()
    print(markdown(runner.results))
    for w in written:
        print(f"wrote {w}" if w.startswith("/") else w, file=sys.stderr)
    return 0


def _rereport(args: argparse.Namespace) -> int:
    from ebpflb.bench.report import markdown
    from ebpflb.bench.runner import judge, write_all

    try:
        results = json.loads(args.from_json.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {args.from_json}: {e}", file=sys.stderr)
        return 1
    judge(results)
    out = args.out or args.from_json.parent
    written = write_all(
        results,
        args.markdown or out / "report.md",
        args.json or out / "results.json",
        args.plot or out / "plot.png",
    )
    print(markdown(results))
    for w in written:
        print(f"wrote {w}" if w.startswith("/") else w, file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ebpflb bench",
        description="ebpflb against no load balancer and kube-proxy's iptables and nftables "
        "modes, in namespace clusters it builds and removes",
    )
    arguments(p)
    return run(p.parse_args(argv))
