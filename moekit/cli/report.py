"""moekit report: a self-contained HTML page about a run (losses, expert load, routing by language)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="write the HTML run report")
    p.add_argument("run_dir")
    p.add_argument("--baseline", metavar="RUN_DIR", help="overlay a (dense) baseline run's curves")
    p.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--windows", type=int, default=512, help="validation windows routed for the breakdowns")
    p.set_defaults(run=run)


def run(args) -> int:
    run_dir = Path(args.run_dir)
    if (run_dir / "federate.json").exists():        # a moekit federate directory
        from moekit.federate.report import write_federated_report
        if args.baseline:
            raise ValueError("--baseline: a federation's report compares its clients; drop --baseline")
        path, lines = write_federated_report(run_dir, Path(args.out) if args.out else None), []
    else:
        from moekit.report.html import write_run_report
        path, lines = write_run_report(run_dir, Path(args.baseline) if args.baseline else None,
                                       Path(args.out) if args.out else None, args.windows)
    for line in lines:
        print(line)
    print(f"wrote {path}")
    return 0
