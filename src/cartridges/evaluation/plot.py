"""The trade-off figure: quality versus KV cache memory, one panel per measure, ready for a paper.

Panel titles, axis labels and the plotted metric come from the task registry (the QA panel draws
exact match, the headline number, not token F1). The memory axis is logarithmic with major ticks
only at the measured cache sizes, labelled with the size and the compression versus ICL, and no
minor labels. The cartridges' points are named by :mod:`cartridges.evaluation.labels`, which
keeps labels from overlapping. Saving the figure (PNG, SVG) is the catalog's business; this
module only draws, on a figure of its own (no pyplot state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from cartridges.evaluation.labels import place_labels
from cartridges.evaluation.methods import KINDS
from cartridges.evaluation.tasks import Measure, Metric, measure_of

MARKERS = {
    "icl": "*",
    "truncated_icl": "s",
    "composition": "D",
    "document_cartridge": "^",
    "document_icl": "P",
    "routed": "v",
    "oracle_selection": "X",
}  # others: "o"
# Kinds whose points answer different question sets (one document's, several documents'): not
# joined by a line, and each labelled with the questions it answers.
SEPARATE = ("document_cartridge", "composition", "document_icl", "routed", "oracle_selection")
PANEL_SIZE = (4.4, 3.6)  # inches per panel
LABEL_SIZE = 7  # points
ZORDER = {"truncated_icl": 2, "icl": 4}  # cartridges (3) drawn over the baseline they match
UNLABELLED = ("icl", "truncated_icl")  # their points are told apart by legend and size axis
MAX_SIZE_TICKS = 7  # across a panel: fewer when the measured sizes are close


@dataclass
class _Panel:
    measure: Measure
    rows: pd.DataFrame


def tradeoff_figure(report: pd.DataFrame) -> Figure:
    """Quality versus KV bytes for each (task, metric) of ``report``; methods joined by kind.

    Each method is a point; a kind with several sizes (truncated ICL, cartridges) is a line
    across them; a method without KV cache (no context) is a dashed horizontal line.
    """
    panels = _panels(report)
    count = max(len(panels), 1)
    figure = Figure(figsize=(PANEL_SIZE[0] * count, PANEL_SIZE[1] + 0.9))
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, count, i + 1) for i in range(count)]
    icl_bytes = _icl_bytes(report)
    colors = _kind_colors(report)
    for axis, panel in zip(axes, panels, strict=False):
        _draw(axis, panel, colors)
        _size_axis(axis, panel.rows, icl_bytes)
    handles = _legend_handles(axes)
    figure.suptitle("Quality versus KV cache memory", fontsize=11)
    legend = figure.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), 2 * count + 1) or 1,
        fontsize=8,
        frameon=False,
    )
    renderer = figure.canvas.get_renderer()
    room = legend.get_window_extent(renderer).height / figure.bbox.height if handles else 0.0
    figure.tight_layout(rect=(0, room + 0.01, 1, 0.96))
    for axis, panel in zip(axes, panels, strict=False):
        _label_points(axis, panel)
    return figure


def _panels(report: pd.DataFrame) -> list[_Panel]:
    """One panel per (task, metric) in report order, with the rows that have a plotted value."""
    panels = []
    for (task, metric), rows in report.groupby(["task", "metric"], sort=False):
        measure = measure_of(task)
        if measure is None or measure.metric.name != metric:  # not a registered measure
            higher = bool(rows["higher_is_better"].iloc[0])
            measure = Measure(task, task, Metric(metric, metric, higher))
        rows = rows.dropna(subset=[measure.plot_column])
        if len(rows):
            panels.append(_Panel(measure, rows))
    return panels


def _icl_bytes(report: pd.DataFrame) -> float:
    """KV bytes of the whole corpus in context (more than ICL's row holds when it was cut)."""
    icl = report[report["kind"] == "icl"]
    if not len(icl):
        return math.nan
    row = icl.iloc[0]
    ratio = float(row["compression_vs_icl"])
    return float(row["kv_bytes"]) * (ratio if math.isfinite(ratio) and ratio > 0 else 1.0)


def _kind_colors(report: pd.DataFrame) -> dict[str, str]:
    kinds = list(dict.fromkeys([*KINDS, *report["kind"]]))
    return {kind: f"C{index % 10}" for index, kind in enumerate(kinds)}


def _draw(axis: Axes, panel: _Panel, colors: dict[str, str]) -> None:
    column, metric = panel.measure.plot_column, panel.measure.plot_metric
    rows = panel.rows
    for kind, series in rows[rows["kv_bytes"] > 0].groupby("kind", sort=False):
        series = series.sort_values("kv_bytes")
        axis.plot(
            series["kv_bytes"],
            series[column],
            marker=MARKERS.get(kind, "o"),
            markersize=9 if kind == "icl" else 5,
            linewidth=1.2,
            linestyle="none" if kind in SEPARATE else "-",
            color=colors[kind],
            zorder=ZORDER.get(kind, 3),
            label=KINDS.get(kind, kind),
        )
    for row in rows[rows["kv_bytes"] == 0].itertuples():
        axis.axhline(
            getattr(row, column),
            linestyle="--",
            linewidth=1.0,
            color=colors.get(row.kind, "grey"),
            label=f"{KINDS.get(row.kind, row.method)} (no KV cache)",
        )
    better = "higher" if metric.higher_is_better else "lower"
    axis.set_ylabel(f"{metric.label} ({better} is better)", fontsize=9)
    axis.set_title(panel.measure.title, fontsize=10)
    if metric.limits is not None:
        low, high = metric.limits
        margin = 0.06 * (high - low)
        axis.set_ylim(low - margin, high + margin)
    axis.grid(True, which="major", linewidth=0.4, alpha=0.5)
    axis.tick_params(labelsize=8)


def _size_axis(axis: Axes, rows: pd.DataFrame, icl_bytes: float) -> None:
    """Log x axis with major ticks at the measured sizes (thinned when close), no minor ones."""
    sizes = sorted({float(b) for b in rows["kv_bytes"] if b > 0})
    axis.set_xscale("log")
    axis.set_xlabel("KV cache size (log scale) / compression of the corpus", fontsize=9)
    if not sizes:
        return
    low, high = sizes[0] / 1.8, sizes[-1] * 1.8
    axis.set_xlim(low, high)
    spacing = max(1.3, (high / low) ** (1 / MAX_SIZE_TICKS))
    ticks = [sizes[-1]]
    for size in reversed(sizes[:-1]):  # from the largest (ICL) down
        if ticks[-1] / size >= spacing:
            ticks.append(size)
    ticks.sort()
    axis.xaxis.set_major_locator(FixedLocator(ticks))
    axis.set_xticklabels([_size_label(size, icl_bytes) for size in ticks])
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_minor_formatter(NullFormatter())


def _size_label(size: float, icl_bytes: float) -> str:
    compression = icl_bytes / size if math.isfinite(icl_bytes) else math.nan
    ratio = f"\n{compression:.3g}\u00d7" if math.isfinite(compression) else ""
    return human_bytes(size) + ratio


def human_bytes(size: float) -> str:
    """``size`` in binary units, three significant digits or more: ``48 KiB``, ``1.5 MiB``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size /= 1024
        units.pop(0)
    unit = units[0]
    return f"{size:.0f} {unit}" if size >= 100 else f"{size:.3g} {unit}"


def _legend_handles(axes: list[Axes]) -> list[Line2D]:
    """One handle per label across panels (the same kinds recur in every panel)."""
    seen: dict[str, Line2D] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values())


def _label_points(axis: Axes, panel: _Panel) -> None:
    """Name the cartridges' points; ICL and truncated ICL are named by the legend and the axis."""
    column = panel.measure.plot_column
    rows = panel.rows[(panel.rows["kv_bytes"] > 0) & ~panel.rows["kind"].isin(UNLABELLED)]
    labels = [
        ((row.kv_bytes, getattr(row, column)), _point_label(row)) for row in rows.itertuples()
    ]
    place_labels(axis, labels, LABEL_SIZE)


def _point_label(row) -> str:
    """A cartridge's name; a point scored on some documents' questions says which."""
    questions = getattr(row, "questions", "all")
    several = isinstance(questions, str) and "+" in questions
    if row.kind in SEPARATE and several:
        return f"{row.method} (questions: {questions})"
    return row.method
