"""
python -m benchmarks [all | echo chat log http] [--smoke] [--rounds N] [--baseline PATH] ...

Starts each twistnet service through twistd and each peer as a child process on 127.0.0.1,
drives them in interleaved rounds, prints the median of each figure with its ratio to the
peers, and writes the tables, the machine and the targets to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks.processes import baseline_sources, raise_fd_limit, twistd_executable
from benchmarks.workloads import TARGETS, WORKLOADS, Settings, run_workload

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
SMOKE_OUTPUT = ROOT / "benchmarks" / ".build" / "benchmarks-smoke.md"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "workloads",
        nargs="*",
        default=["all"],
        choices=["all", *WORKLOADS],
        help="what to run (default: all)",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny run of a few seconds (CI)")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 3)")
    parser.add_argument(
        "--duration", type=float, help="seconds per timed echo/HTTP run (default 5)"
    )
    parser.add_argument("--idle", type=int, help="idle connections for memory (default 5000)")
    parser.add_argument(
        "--large", action="store_true", help="add the 5,000-client point to the chat growth"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy profile of each twistnet server in one extra run (into benchmarks/.build/)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="PATH",
        help="a checkout of an older twistnet: its services run as one more contender each",
    )
    parser.add_argument("--output", type=Path, help="where to write the Markdown report")
    parser.add_argument("--no-write", action="store_true", help="print only, write no report")
    parser.add_argument(
        "--remark", action="append", default=[], help="a line for the report (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "twisted" / "plugins" / "twistnet_plugins.py").is_file():
            parser.error(f"--baseline {args.baseline}: no twisted/plugins/twistnet_plugins.py")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    workdir = ROOT / "benchmarks" / ".build" / "run"
    settings = Settings.smoke() if args.smoke else Settings()
    changes: dict = {"workdir": workdir}
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.duration is not None:
        changes["duration"] = args.duration
    if args.idle is not None:
        changes["idle"] = args.idle
    if args.profile:
        changes["profile"] = True
    if args.large:
        changes["chat_growth"] = (*settings.chat_growth, 5000)
    if args.baseline is not None:
        changes["baseline"] = args.baseline
    return dataclasses.replace(settings, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    names = list(WORKLOADS) if "all" in args.workloads else list(dict.fromkeys(args.workloads))
    settings = settings_from(args)
    limit = raise_fd_limit(max(4 * settings.idle, 1024))
    if limit < settings.idle + 100:
        print(f"warning: open-file limit {limit} is below {settings.idle} idle connections")
    shutil.rmtree(settings.workdir, ignore_errors=True)
    info = report.machine()
    load = os.getloadavg()[0]
    for name in names:
        info[f"twistd for {name}"] = twistd_executable(f"twistnet-{name}")
    baseline = ""
    if settings.baseline is not None:
        try:
            sources = baseline_sources(settings.baseline, [f"twistnet-{n}" for n in names])
        except ValueError as error:
            print(f"python -m benchmarks: error: --baseline: {error}", file=sys.stderr)
            return 2
        baseline = f"{settings.baseline} (commit {commit_of(settings.baseline)})"
        info["baseline"] = baseline
        info["baseline loads"] = ", ".join(sorted(set(sources.values())))
    started = time.monotonic()
    print(f"twistnet benchmarks: {' '.join(names)} ({describe(settings)})", flush=True)

    sections: list[report.Section] = []
    for name in names:
        sections += run_workload(name, settings)

    print()
    for section in sections:
        print(report.text_table(section))
        print()
    targets = [t for t in TARGETS if any(s.key == t.section for s in sections)]
    print(report.targets_text(sections, targets))
    if baseline:
        print()
        print(report.versus_baseline_text(sections, baseline))
    print(f"\n{time.monotonic() - started:.0f} s in all")

    raw = settings.workdir.parent / "results.json"
    raw.write_text(json.dumps(report.as_json(sections, info), indent=1))
    print(f"every round's figures: {raw}")
    if not args.no_write:
        output = args.output or (SMOKE_OUTPUT if args.smoke else DEFAULT_OUTPUT)
        output.parent.mkdir(parents=True, exist_ok=True)
        remarks = list(args.remark)
        if load > (os.cpu_count() or 1) * 0.5:
            remarks.append(
                f"The machine was loaded when this run started (load average {load:.2f} on "
                f"{os.cpu_count()} cores): absolute figures are noisy, the interleaved ratios "
                "less so."
            )
        command = "uv run --group bench python -m benchmarks " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        text = report.markdown(
            sections, targets, info, command.strip(), describe(settings), remarks, baseline
        )
        output.write_text(text + "\n")
        print(f"wrote {output}")
    return 0


def commit_of(checkout: Path) -> str:
    """The short commit of a git checkout, for the report; "unknown" when it is none."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    done = subprocess.run(
        [git, "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def describe(settings: Settings) -> str:
    mode = "smoke run, " if settings.idle < 1000 else ""
    return (
        f"{mode}{settings.rounds} rounds, {settings.duration:g} s per timed run, "
        f"{settings.idle:,} idle connections"
    )


if __name__ == "__main__":
    sys.exit(main())
