"""Point labels that overlap nothing: a simple, deterministic collision rule for a plot's axes.

Each label takes the first offset, nearest first on rings of eight directions around its point,
whose text box meets no label placed before it, no marker, and none of the axes' title, tick
labels or axis labels. Offsets inside the axes are tried before those elsewhere on the figure. A
label may cross a line (its white backing keeps it readable). A label that fits nowhere is left
out rather than drawn over another. No optimisation, no iteration: the result depends only on
the order the labels are given in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

RADII = (5, 12, 20, 28, 36, 46, 58, 72)  # points
DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))
BACKING = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
MARKER_ROOM = 4.0  # points around a marker that labels keep clear of
GAP = 1.5  # points between two labels (their white backings must not touch)


def place_labels(
    axis: Axes, labels: Sequence[tuple[tuple[float, float], str]], fontsize: float = 7
) -> list[Annotation]:
    """Annotate ``(point, text)`` pairs (points in data coordinates) without any overlap.

    The axes' layout must be final: positions are computed in pixels from the current layout.
    """
    renderer = axis.figure.canvas.get_renderer()
    scale = axis.figure.dpi / 72  # points -> pixels
    room = MARKER_ROOM * scale
    markers = [
        Bbox.from_extents(x - room, y - room, x + room, y + room) for x, y in _marker_pixels(axis)
    ]
    fixed = [artist.get_window_extent(renderer) for artist in _axis_texts(axis)]
    frame, page = axis.get_window_extent(renderer), axis.figure.bbox
    placed: list[Annotation] = []
    taken = markers + [box for box in fixed if box.width > 0]
    for point, text in labels:
        for dx, dy, inside in _offsets():
            label = _annotate(axis, text, point, dx, dy, fontsize)
            box = label_box(label, renderer)
            clear = not any(box.overlaps(b) for b in taken)
            if clear and _contains(frame if inside else page, box):
                placed.append(label)
                taken.append(box.padded(GAP * scale))
                break
            label.remove()
    return placed


def label_box(label: Annotation, renderer=None) -> Bbox:
    """A label's text box in pixels (its leader line, if any, left out)."""
    renderer = renderer or label.figure.canvas.get_renderer()
    label.update_positions(renderer)  # an annotation's text follows its point only once updated
    return Text.get_window_extent(label, renderer)


def _offsets() -> Iterator[tuple[float, float, bool]]:
    for inside in (True, False):
        for radius in RADII:
            for dx, dy in DIRECTIONS:
                yield dx * radius, dy * radius, inside


def _annotate(
    axis: Axes, text: str, point: tuple[float, float], dx: float, dy: float, fontsize: float
) -> Annotation:
    horizontal = "left" if dx > 0 else "right" if dx < 0 else "center"
    vertical = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    far = max(abs(dx), abs(dy)) > RADII[1]
    return axis.annotate(
        text,
        point,
        xytext=(dx, dy),
        textcoords="offset points",
        ha=horizontal,
        va=vertical,
        fontsize=fontsize,
        bbox=BACKING,
        arrowprops={"arrowstyle": "-", "linewidth": 0.5, "color": "0.5"} if far else None,
    )


def _axis_texts(axis: Axes) -> list[Text]:
    """The axes' own texts that labels must not cover."""
    texts = [axis.title, axis.xaxis.label, axis.yaxis.label]
    texts += [t for t in axis.get_xticklabels() + axis.get_yticklabels() if t.get_text()]
    return [t for t in texts if t.get_visible() and t.get_text()]


def _marker_pixels(axis: Axes) -> np.ndarray:
    """Pixel positions of every marker drawn on the axes."""
    points = [
        line.get_transform().transform(line.get_xydata())
        for line in axis.get_lines()
        if line.get_marker() not in (None, "", "None", " ")
    ]
    return _finite(np.concatenate(points)) if points else np.empty((0, 2))


def _finite(points: np.ndarray) -> np.ndarray:
    return points[np.isfinite(points).all(axis=1)]


def _contains(outer: Bbox, inner: Bbox) -> bool:
    horizontal = outer.x0 <= inner.x0 and inner.x1 <= outer.x1
    return horizontal and outer.y0 <= inner.y0 and inner.y1 <= outer.y1
