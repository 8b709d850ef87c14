"""Results of a run: medians over rounds, ratios to the peers, targets, text and Markdown."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import dataclass, field

#: Appended to a twistnet service's name for the same service from the --baseline checkout.
BASELINE_SUFFIX = " (baseline)"
#: Appended to a twistnet service's name for the same service on Twisted's stock reactor.
STOCK_REACTOR_SUFFIX = " (stock reactor)"


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    higher_is_better: bool = True
    digits: int = 0


@dataclass
class Row:
    contender: str
    #: Round number -> the figures measured in that round.
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)
    missing: str | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, measured: dict[str, float], round_number: int | None = None) -> None:
        number = round_number if round_number is not None else len(self.rounds) + 1
        self.rounds[number] = dict(measured)

    def values(self, key: str) -> list[float]:
        return [figures[key] for figures in self.rounds.values() if key in figures]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None


@dataclass
class Section:
    """One table: a workload, its figures, one row per contender; the first row is twistnet's."""

    key: str
    title: str
    figures: list[Figure]
    rows: dict[str, Row] = field(default_factory=dict)
    note: str = ""
    #: A py-spy summary of twistnet's server under this load, when one was taken.
    profile: str = ""

    @property
    def primary(self) -> Figure:
        return self.figures[0]

    def row(self, contender: str) -> Row:
        return self.rows.setdefault(contender, Row(contender))

    @property
    def subject(self) -> Row | None:
        return next(iter(self.rows.values()), None)

    @property
    def baseline(self) -> Row | None:
        """The row of twistnet's service from the --baseline checkout, if one was run."""
        subject = self.subject
        return None if subject is None else self.rows.get(subject.contender + BASELINE_SUFFIX)

    def ratio(self, contender: str) -> float | None:
        """
        twistnet's primary figure divided by C{contender}'s: the median of the per-round
        ratios (each round measures both back to back, under the same load from elsewhere),
        or the ratio of the medians when they share no round.
        """
        subject = self.subject
        if subject is None or contender not in self.rows:
            return None
        key = self.primary.key
        theirs = self.rows[contender]
        paired = [
            ours[key] / theirs.rounds[number][key]
            for number, ours in subject.rounds.items()
            if key in ours and theirs.rounds.get(number, {}).get(key)
        ]
        if paired:
            return statistics.median(paired)
        ours_median, theirs_median = subject.median(key), theirs.median(key)
        if ours_median is None or not theirs_median:
            return None
        return ours_median / theirs_median


@dataclass(frozen=True)
class Target:
    text: str
    section: str
    peer: str | None  # None: an absolute figure of twistnet's row
    threshold: float
    at_most: bool = False  # True: met when below the threshold (memory)

    def evaluate(self, sections: dict[str, Section]) -> tuple[str, float | None]:
        section = sections.get(self.section)
        if section is None or section.subject is None:
            return "not run", None
        if self.peer is None:
            value = section.subject.median(section.primary.key)
        else:
            value = section.ratio(self.peer)
        if value is None:
            return "not measured", None
        met = value < self.threshold if self.at_most else value >= self.threshold
        return ("met" if met else "NOT met"), value


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0 and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table_rows(section: Section) -> tuple[list[str], list[list[str]]]:
    primary = section.primary
    arrow = "" if primary.higher_is_better else " (lower is better)"
    header = [
        "contender",
        *(figure.label for figure in section.figures),
        f"twistnet ÷ contender, {primary.label}{arrow}",
        "rounds",
    ]
    rows = []
    subject = section.subject
    for row in section.rows.values():
        if row.missing:
            rows.append([row.contender, "not measured (see below)"] + [""] * (len(header) - 2))
            continue
        ratio = "" if row is subject else fmt(section.ratio(row.contender), 2)
        if ratio and ratio != "-":
            ratio += "x"
        rounds = len(row.values(primary.key))
        cells = [fmt(row.median(figure.key), figure.digits) for figure in section.figures]
        rows.append([row.contender, *cells, ratio, str(rounds)])
    return header, rows


def text_table(section: Section) -> str:
    header, rows = table_rows(section)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"== {section.title}"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    lines += [f"   {row.contender}: {note}" for row in section.rows.values() for note in notes(row)]
    return "\n".join(lines)


def notes(row: Row) -> list[str]:
    return ([f"missing: {row.missing}"] if row.missing else []) + row.notes


def markdown_table(section: Section) -> str:
    header, rows = table_rows(section)
    lines = [f"### {section.title}", ""]
    if section.note:
        lines += [section.note, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    remarks = [f"- {row.contender}: {note}" for row in section.rows.values() for note in notes(row)]
    if remarks:
        lines += ["", *remarks]
    if section.profile:
        lines += [
            "",
            "Profile of the twistnet server under this load:",
            "",
            "```",
            section.profile,
            "```",
        ]
    return "\n".join(lines)


def machine() -> dict[str, str]:
    import twisted

    info = {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
    }
    for module in ("uvloop", "aiohttp"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "not installed"
    try:
        info["load average at start"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(
    sections: list[Section],
    targets: list[Target],
    info: dict[str, str],
    command: str,
    settings: str,
    remarks: list[str],
    baseline: str = "",
) -> str:
    by_key = {section.key: section for section in sections}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# twistnet benchmarks",
        "",
        f"Measured {now} with `{command}` ({settings}).",
        "Each figure is the median over the rounds; the contenders of a table were driven in",
        "interleaved rounds (A B C A B C ...) on the same machine, loopback only, by load",
        "generators written in C (`benchmarks/loadgen/`) and `wrk` for HTTP. A ratio is the",
        "median over the rounds of twistnet's figure divided by the peer's in the same round.",
        "",
        "## Machine",
        "",
        *(f"- {name}: {value}" for name, value in info.items()),
        "",
    ]
    if remarks:
        out += [*(f"> {remark}" for remark in remarks), ""]
    out += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    for target in targets:
        verdict, value = target.evaluate(by_key)
        shown = "-" if value is None else (f"{value:.2f}x" if target.peer else fmt(value))
        out.append(f"| {target.text} | {shown} | {verdict} |")
    out.append("")
    if baseline:
        out += versus_baseline_markdown(sections, baseline)
    out += ["## Results", ""]
    for section in sections:
        out += [markdown_table(section), ""]
    return "\n".join(out)


def as_json(sections: list[Section], info: dict[str, str]) -> dict:
    """Every round's figures, for a closer look than the medians."""
    return {
        "machine": info,
        "sections": [
            {
                "key": section.key,
                "title": section.title,
                "rows": {row.contender: _row_json(row) for row in section.rows.values()},
            }
            for section in sections
        ],
    }


def _row_json(row: Row) -> dict:
    return {"rounds": row.rounds, "missing": row.missing, "notes": row.notes}


def versus_baseline(sections: list[Section]) -> list[tuple[str, str, str, str]]:
    """
    Per table run with a baseline: its title, twistnet's primary figure now, the baseline's,
    and now ÷ baseline (the median of per-round ratios, as for the peers).
    """
    lines = []
    for section in sections:
        baseline = section.baseline
        if baseline is None:
            continue
        primary, subject = section.primary, section.subject
        arrow = "" if primary.higher_is_better else ", lower is better"
        ratio = section.ratio(baseline.contender)
        lines.append(
            (
                f"{section.title} ({primary.label}{arrow})",
                fmt(subject.median(primary.key), primary.digits),
                fmt(baseline.median(primary.key), primary.digits),
                "-" if ratio is None else f"{ratio:.2f}x",
            )
        )
    return lines


def versus_baseline_text(sections: list[Section], baseline: str) -> str:
    lines = [f"== vs baseline ({baseline}): now, baseline, now ÷ baseline"]
    for title, now, before, ratio in versus_baseline(sections):
        lines.append(f"  {ratio:>7}  {now:>10}  {before:>10}  {title}")
    return "\n".join(lines)


def versus_baseline_markdown(sections: list[Section], baseline: str) -> list[str]:
    out = [
        "## vs baseline",
        "",
        f"twistnet now against the same services from {baseline}, in the same rounds.",
        "",
        "| table (figure) | now | baseline | now ÷ baseline |",
        "|---|---|---|---|",
    ]
    for cells in versus_baseline(sections):
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return [*out, ""]


def targets_text(sections: list[Section], targets: list[Target]) -> str:
    by_key = {section.key: section for section in sections}
    lines = ["== targets"]
    for target in targets:
        verdict, value = target.evaluate(by_key)
        shown = "-" if value is None else (f"{value:.2f}x" if target.peer else fmt(value))
        lines.append(f"  {verdict:12} {shown:>10}  {target.text}")
    return "\n".join(lines)
