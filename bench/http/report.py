"""The HTTP benchmark's report: Markdown tables, the targets of issue 6 checked against
the medians, and a PNG chart, written to ``bench/results/``.

Each cell is the median over the repetitions with the min-max range in brackets; every
ratio is taken against ``baseline`` from the same repetition before the median.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from asgi_audit.recording.writer import MAX_FRAME_BYTES, SpoolRecorder
from bench.http.limit import Costs, Limit
from bench.http.load import Sample

BASELINE = "baseline"
RECIPES = ("recipe-middleware", "recipe-route")
BLOCKING = ("asgi-audit", "asgi-audit-postgres")  # overflow="block": nothing may be lost
SMALL = "1 KB POST, c=8"
Results = dict[str, dict[str, list[Sample]]]  # workload -> variant -> one sample per rep


@dataclass
class Report:
    results: Results
    variants: list[str]
    args: argparse.Namespace
    body_size: int
    small_size: int
    costs: Costs
    limit: Limit | None
    elapsed: float

    def samples(self, label: str, variant: str) -> list[Sample]:
        return self.results.get(label, {}).get(variant, [])

    def values(self, label: str, variant: str, metric: str) -> list[float]:
        return [s.metrics[metric] for s in self.samples(label, variant) if metric in s.metrics]

    def ratios(self, label: str, variant: str, metric: str) -> list[float]:
        """Per repetition, the variant's figure over baseline's from the same repetition."""
        pairs = zip(self.samples(label, variant), self.samples(label, BASELINE), strict=False)
        return [
            mine.metrics[metric] / base.metrics[metric]
            for mine, base in pairs
            if metric in mine.metrics and base.metrics.get(metric)
        ]

    def differences(self, label: str, variant: str, metric: str) -> list[float]:
        pairs = zip(self.samples(label, variant), self.samples(label, BASELINE), strict=False)
        return [
            mine.metrics[metric] - base.metrics[metric]
            for mine, base in pairs
            if metric in mine.metrics and metric in base.metrics
        ]

    def labels(self, kind: str) -> list[str]:
        if kind == "open":
            return [label for label in self.results if "/s" in label and " at " in label]
        if kind == "stream":
            return [label for label in self.results if label.startswith("stream ")]
        return [label for label in self.results if ", c=" in label]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float], form: Callable[[float], str]) -> str:
    """Median and, with more than one value, the min-max range."""
    if not values:
        return "—"
    middle = form(statistics.median(values))
    if min(values) == max(values):
        return middle
    return f"{middle} ({form(min(values))} to {form(max(values))})"


def x(value: float) -> str:
    return f"{value:.2f}x"


def ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def records_cells(samples: list[Sample]) -> tuple[str, str]:
    """Records stored / exchanges answered (less those dropped by policy) over all
    repetitions, and the store's catch-up seconds."""
    if all(s.stored is None for s in samples):
        return "", ""
    stored = sum(s.stored or 0 for s in samples)
    expected = sum(s.sent - int(s.metrics.get("dropped", 0)) for s in samples)
    times = [s.catch_up for s in samples if s.catch_up is not None]
    lost = f" (**{expected - stored} lost**)" if stored < expected else ""
    return f"{stored}/{expected}{lost}", spread(times, lambda v: f"{v:.2f}")


def notes_cell(samples: list[Sample], needed: Iterable[str]) -> str:
    notes: list[str] = []
    for number, sample in enumerate(samples, 1):
        notes.extend(f"rep {number}: {note}" for note in sample.notes)
    wanted = set(needed)
    if samples and not any(wanted & set(s.metrics) for s in samples):
        notes.insert(0, "**FAILED in every repetition**")
    return "; ".join(notes).replace("|", "/")


def closed_table(report: Report) -> list[str]:
    lines = [
        "| workload | variant | p50 ms | p99 ms | req/s | req/s vs base | p99 vs base "
        "| CPU ms/exchange | records stored / expected | store catch-up s | recorded/s "
        "| dropped | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label in report.labels("closed"):
        for variant in report.variants:
            samples = report.samples(label, variant)
            dropped = report.values(label, variant, "dropped")
            cells = [
                spread(report.values(label, variant, "p50"), ms),
                spread(report.values(label, variant, "p99"), ms),
                spread(report.values(label, variant, "rps"), lambda v: f"{v:.0f}"),
                spread(report.ratios(label, variant, "rps"), x),
                spread(report.ratios(label, variant, "p99"), x),
                spread(report.values(label, variant, "cpu_ms"), lambda v: f"{v:.2f}"),
                *records_cells(samples),
                spread(report.values(label, variant, "recorded_rps"), lambda v: f"{v:.0f}")
                if variant != BASELINE and not variant.startswith("recipe")
                else "",
                f"{sum(dropped):.0f}" if dropped else "",
                notes_cell(samples, ("rps",)),
            ]
            lines.append(f"| {label} | {variant} | {' | '.join(cells)} |")
    return lines


def open_table(report: Report) -> list[str]:
    lines = [
        "| workload | variant | p50 ms | p99 ms | p50 vs base | p99 vs base | req/s "
        "| records stored / expected | store catch-up s | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label in report.labels("open"):
        for variant in report.variants:
            samples = report.samples(label, variant)
            cells = [
                spread(report.values(label, variant, "p50"), ms),
                spread(report.values(label, variant, "p99"), ms),
                spread(report.ratios(label, variant, "p50"), x),
                spread(report.ratios(label, variant, "p99"), x),
                spread(report.values(label, variant, "rps"), lambda v: f"{v:.0f}"),
                *records_cells(samples),
                notes_cell(samples, ("p50",)),
            ]
            lines.append(f"| {label} | {variant} | {' | '.join(cells)} |")
    return lines


def stream_table(report: Report, label: str) -> list[str]:
    lines = [
        f"| {label} | TTFB ms | TTFB minus base ms | total s | total vs base "
        "| records stored / expected | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for variant in report.variants:
        samples = report.samples(label, variant)
        cells = [
            spread(report.values(label, variant, "ttfb"), lambda v: f"{v:.2f}"),
            spread(report.differences(label, variant, "ttfb"), lambda v: f"{v:+.2f}"),
            spread(report.values(label, variant, "total"), lambda v: f"{v:.2f}"),
            spread(report.ratios(label, variant, "total"), x),
            records_cells(samples)[0],
            notes_cell(samples, ("ttfb",)),
        ]
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    return lines


def memory_table(report: Report, big: str) -> list[str]:
    lines = [
        "| variant | peak RSS after all load, MiB | minus base | "
        f"peak RSS, {big} alone, MiB | minus base | {big} notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for variant in report.variants:
        samples = report.samples(big, variant)
        cells = [
            spread(report.values("peak RSS", variant, "rss"), lambda v: f"{v:.0f}"),
            spread(report.differences("peak RSS", variant, "rss"), lambda v: f"{v:+.0f}"),
            spread(report.values(big, variant, "rss"), lambda v: f"{v:.0f}"),
            spread(report.differences(big, variant, "rss"), lambda v: f"{v:+.0f}"),
            notes_cell(samples, ("ttfb",)),
        ]
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    return lines


def at_most(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


def verdict(value: float | None, ok: bool) -> str:
    if value is None:
        return "no figure"
    return "met" if ok else "**NOT MET**"


def targets(report: Report) -> list[str]:
    """The targets (issues 6 and 13), each against the medians, for the variants that must
    meet them."""
    open_labels = report.labels("open")
    stream_label = f"stream {report.args.stream_mib} MiB"
    big = f"stream {report.args.big_stream_mib} MiB"
    lines = ["| target | variant | measured | verdict |", "|---|---|---:|---|"]

    def row(target: str, variant: str, measured: str, value: float | None, ok: bool) -> None:
        lines.append(f"| {target} | {variant} | {measured} | {verdict(value, ok)} |")

    for variant in [v for v in report.variants if v in BLOCKING]:
        for label in open_labels:
            for metric, bound in (("p50", 1.05), ("p99", 1.25)):
                value = median(report.ratios(label, variant, metric))
                row(
                    f"{label}: {metric} ≤ {bound:.2f}x",
                    variant,
                    x(value or 0),
                    value,
                    (value or 9) <= bound,
                )
        value = median(report.ratios(SMALL, variant, "rps"))
        row(f"{SMALL}: req/s ≥ 0.7x", variant, x(value or 0), value, (value or 0) >= 0.7)
        value = median(report.ratios(SMALL, variant, "p99"))
        row(f"{SMALL}: p99 ≤ 3x", variant, x(value or 0), value, (value or 9) <= 3)
        value = median(report.differences(stream_label, variant, "ttfb"))
        row(
            f"{stream_label}: TTFB ≤ base + 1 ms",
            variant,
            f"{value or 0:+.2f} ms",
            value,
            at_most(value, 1.0),
        )
        value = median(report.ratios("JSON 1 MB echo, c=8", variant, "rps"))
        row("JSON c=8: req/s ≥ 0.95x", variant, x(value or 0), value, (value or 0) >= 0.95)
        rps = median(report.values("raw 1 MB echo, c=8", variant, "recorded_rps"))
        if report.limit is not None and rps is not None:
            share = rps / report.limit.exchanges_per_s
            row("raw c=8: recorded/s ≥ 0.8x recording limit", variant,
                f"{rps:.0f}/s = {share:.2f}x of {report.limit.exchanges_per_s:.0f}/s", share,
                share >= 0.8)  # fmt: skip
        for recipe in [r for r in RECIPES if r in report.variants]:
            mine = report.values("raw 1 MB echo, c=8", variant, "rps")
            theirs = report.values("raw 1 MB echo, c=8", recipe, "rps")
            value = statistics.median(mine) / statistics.median(theirs) if mine and theirs else None
            row(f"raw c=8: req/s ≥ 2x {recipe}", variant, x(value or 0), value, (value or 0) >= 2)
        value = median(report.differences(big, variant, "rss"))
        row(
            f"{big}: peak RSS ≤ base + 64 MiB",
            variant,
            f"{value or 0:+.0f} MiB",
            value,
            at_most(value, 64),
        )
        value = median(report.differences("raw 1 MB echo, c=8", variant, "rss"))
        bound = saturation_bound_mib(report.body_size)
        row(
            f"raw c=8, saturated: peak RSS ≤ base + queue bounds ({bound:.0f} MiB)",
            variant,
            f"{value or 0:+.0f} MiB",
            value,
            at_most(value, bound),
        )
        lost = 0
        runs = 0
        for label in report.results:
            for sample in report.samples(label, variant):
                if sample.stored is not None:
                    runs += 1
                    lost += sample.sent - int(sample.metrics.get("dropped", 0)) - sample.stored
        row("records lost = 0 with block, every run", variant, f"{lost} in {runs} runs",
            float(lost), lost == 0)  # fmt: skip
        base = report.values("unaudited GET, c=8", BASELINE, "rps")
        band = (max(base) - min(base)) / statistics.median(base) if len(base) > 1 else 0.05
        band = max(band, 0.05)
        value = median(report.ratios("unaudited GET, c=8", variant, "rps"))
        within = value is not None and abs(value - 1) <= band
        target = f"unaudited GET: req/s within noise (1 ± {band:.2f}, baseline's own spread)"
        row(target, variant, x(value or 0), value, within)
    return lines


def saturation_bound_mib(body_size: int, concurrency: int = 8) -> float:
    """What asgi-audit may hold beyond the app under saturation, by its configuration:
    the recorder's queue (``max_bytes``), the batch the writer took from it (up to a
    frame's worth), and both bodies of every exchange in flight."""
    defaults = inspect.signature(SpoolRecorder.__init__).parameters
    queue = int(defaults["max_bytes"].default) + MAX_FRAME_BYTES
    return (queue + concurrency * 2 * body_size) / (1 << 20)


def machine(stack: str = "uvicorn-standard") -> str:
    """What the figures depend on: CPU, cores, memory, versions, the server stack."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        memory = f"{kib / (1 << 20):.0f} GiB"
    names = ["fastapi", "starlette", "granian" if stack == "granian" else "uvicorn"]
    if stack != "uvicorn-h11":
        names += [name for name in ("uvloop", "httptools") if find_spec(name) is not None]
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in names)
    http = {
        "uvicorn-standard": "uvicorn[standard]: uvloop and httptools",
        "uvicorn-h11": "uvicorn on h11 and asyncio",
        "granian": "granian (ASGI, uvloop)",
    }.get(stack, stack)
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory} RAM; Python {platform.python_version()}, "
        f"{versions} ({http}); load from hey and wrk on the same cores, loopback"
    )


def markdown(report: Report) -> str:
    args = report.args
    big = f"stream {args.big_stream_mib} MiB"
    stream_label = f"stream {args.stream_mib} MiB"
    limit = (
        report.limit.describe(2 * report.body_size / 1e6)
        if report.limit is not None
        else "recording limit: no baseline figure to compute it from"
    )
    stack = getattr(args, "server", "uvicorn-standard")
    lines = [
        f"# HTTP benchmark on {stack} ({time.strftime('%Y-%m-%d %H:%M %Z')})",
        "",
        f"Machine: {machine(stack)}.",
        "",
        f"Measured here: {report.costs.describe()}. So: {limit}.",
        "",
        f"Bodies: {report.body_size / 1e6:.2f} MB order JSON for both echo routes, "
        f"{report.small_size} bytes for the small POST. Median of {args.repetitions} repetitions "
        f"(min to max); ratios to baseline from the same repetition; {report.elapsed:.0f} s "
        "in all. Reproduce: `bench/run` (or `python -m bench.http`).",
        "",
        f"## Targets on {stack}",
        "",
        *targets(report),
        "",
        f"## Response time at a steady rate (open loop, hey -q) on {stack}",
        "",
        *open_table(report),
        "",
        f"## Closed loop (hey -c for the 1 MB echoes, wrk -c for small requests) on {stack}",
        "",
        *closed_table(report),
        "",
        f"## Streamed response on {stack}",
        "",
        *stream_table(report, stream_label),
        "",
        f"## Memory on {stack}",
        "",
        *memory_table(report, big),
        "",
        "recorded/s is records in the store over the load and the store's catch-up: the "
        "sustained recording rate (a closed-loop run can briefly outrun the recorder while "
        "its queue fills). "
        "CPU ms/exchange counts the server's process tree (uvicorn and, for asgi-audit, its "
        "shipper) and the load generator, per answered request. Peak RSS is the uvicorn "
        f"process's VmHWM (the shipper child is not included); the {big} runs on a fresh "
        "server, so its peak is the stream's own.",
    ]
    return "\n".join(lines) + "\n"


def chart(report: Report, path: Path) -> None:
    """Three panels: steady-rate latency, closed-loop throughput (both as ratios to
    baseline, with the min-max range), and the 1 GiB stream's peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in report.variants if v != BASELINE]
    figure, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    groups: list[tuple[str, str, str]] = [
        (f"{label.split(' at ')[0]} {metric}", label, metric)
        for label in report.labels("open")
        for metric in ("p50", "p99")
    ]
    _bars(axes[0], report, shown, groups, "latency vs baseline (lower is better)")
    axes[0].axhline(1.05, color="grey", linestyle="--", linewidth=1)
    throughput = [(label, label, "rps") for label in report.labels("closed")]
    _bars(axes[1], report, shown, throughput, "req/s vs baseline (higher is better)", log=True)
    big = f"stream {report.args.big_stream_mib} MiB"
    names = report.variants
    peaks = [median(report.values(big, v, "rss")) or 0.0 for v in names]
    colours = ["grey" if v == BASELINE else f"C{shown.index(v)}" for v in names]
    axes[2].bar(range(len(names)), peaks, color=colours)  # the other panels' colours
    axes[2].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[2].set_title(f"server peak RSS, {big} (MiB)")
    for index, variant in enumerate(names):
        if not report.values(big, variant, "ttfb"):
            axes[2].annotate("failed", (index, peaks[index]), ha="center", fontsize=8)
    figure.suptitle(f"asgi-audit HTTP benchmark, {time.strftime('%Y-%m-%d')}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _bars(
    axis: object,
    report: Report,
    variants: list[str],
    groups: list[tuple[str, str, str]],
    title: str,
    log: bool = False,
) -> None:
    from matplotlib.axes import Axes

    assert isinstance(axis, Axes)
    width = 0.8 / max(1, len(variants))
    for index, variant in enumerate(variants):
        heights, low, high = [], [], []
        for _, label, metric in groups:
            values = report.ratios(label, variant, metric)
            middle = statistics.median(values) if values else 0.0
            heights.append(middle)
            low.append(middle - min(values) if values else 0.0)
            high.append(max(values) - middle if values else 0.0)
        positions = [g + index * width for g in range(len(groups))]
        axis.bar(positions, heights, width, yerr=[low, high], label=variant, capsize=2)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks(
        [g + 0.4 - width / 2 for g in range(len(groups))],
        [name for name, _, _ in groups],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    if log:
        axis.set_yscale("log")
    axis.set_title(title)
    axis.legend(fontsize=7)


def write_report(report: Report, output: Path) -> str:
    """Write the Markdown next to its PNG chart; return the Markdown."""
    output.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    picture = output.with_suffix(".png")
    chart(report, picture)
    output.write_text(text + f"\n![chart]({picture.name})\n")
    return text
