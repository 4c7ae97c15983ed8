"""The ``gradwatch`` command: read a run log written with ``attach(..., log_dir=...)``.

Usage::

    gradwatch report LOG_DIR              # the console summary: verdict, findings, recommendations, layers
    gradwatch report LOG_DIR --json       # the Report as JSON (Report.to_dict())
    gradwatch report LOG_DIR --plot flow.png [--kind all|flow|depth|updates]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Read gradwatch run logs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser("report", help="print the diagnosis a run log holds",
                                 description="Print the diagnosis held in LOG_DIR (written with "
                                             "gradwatch.attach(model, log_dir=LOG_DIR)).")
    report.add_argument("log_dir", metavar="LOG_DIR", help="the directory given as log_dir=")
    report.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    report.add_argument("--plot", metavar="PATH", help="also save a picture (.png, .svg, .pdf); needs "
                                                       "pip install 'gradwatch[plot]'")
    report.add_argument("--kind", default="all", choices=("all", "flow", "depth", "updates"),
                        help="which picture --plot draws (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 fine, 1 the plot failed, 2 no usable log)."""
    args = _parser().parse_args(argv)
    try:
        return _report(args)
    except BrokenPipeError:  # e.g. `gradwatch report LOG | head`
        sys.stderr.close()
        return 0


def _report(args: argparse.Namespace) -> int:
    from gradwatch.core.runlog import load_report
    from gradwatch.errors import LogError

    try:
        report = load_report(args.log_dir)
    except LogError as exc:
        print(f"gradwatch: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from gradwatch.reporters.console import make_console, render

        make_console().print(render(report))
    if args.plot:
        try:
            path = report.plot(args.plot, kind=args.kind)
        except (ImportError, ValueError, OSError) as exc:
            print(f"gradwatch: cannot plot: {exc}", file=sys.stderr)
            return 1
        print(f"gradwatch: plot saved to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
