"""The trade-off figure: exact match for QA, human names, readable axes, labels not overlapping."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
from matplotlib.text import Annotation

from cartridges.evaluation import report_columns
from cartridges.evaluation.labels import label_box
from cartridges.evaluation.plot import human_bytes, tradeoff_figure

BYTES_PER_TOKEN = 2048
ICL_TOKENS = 131
TASKS = (
    ("qa", "token_f1", True),
    ("multiple_choice", "option_accuracy", True),
    ("log_perplexity", "answer_log_perplexity", False),
)


def report(sizes=(8, 9, 10, 11, 12, 16), quality: float = 0.5) -> pd.DataFrame:
    """ICL, no context, and a cartridge and truncated ICL at each (close) size, all on a par."""
    rows = []

    def add(method: str, kind: str, tokens: int, value: float, exact: float) -> None:
        size = tokens * BYTES_PER_TOKEN
        for task, metric, higher in TASKS:
            rows.append(
                {
                    "method": method,
                    "kind": kind,
                    "questions": "all",
                    "task": task,
                    "metric": metric,
                    "quality": value if higher else 1 - value,
                    "higher_is_better": higher,
                    "exact_match": exact if task == "qa" else math.nan,
                    "num_items": 4,
                    "kv_tokens": tokens,
                    "kv_bytes": size,
                    "compression_vs_icl": ICL_TOKENS / tokens if tokens else math.inf,
                    "prefill_ms": 1.0,
                    "decode_tok_s_b1": 10.0,
                    "cartridge_version": "",
                    "note": "",
                }
            )

    add("icl", "icl", ICL_TOKENS, 1.0, 1.0)
    add("no_context", "no_context", 0, 0.67, 0.0)  # token F1 flatters: no exact answer at all
    for p in sizes:
        add(f"cartridge_p{p}", "cartridge", p, quality, quality / 2)
        add(f"truncated_icl_p{p}", "truncated_icl", p, quality, quality / 2)
    add("composition", "composition", sum(sizes), quality, quality / 2)
    return pd.DataFrame(rows, columns=report_columns((1,)))


@pytest.fixture()
def figure():
    return tradeoff_figure(report())


def test_the_qa_panel_draws_exact_match_and_panels_have_human_names(figure):
    qa, choice, perplexity = figure.axes
    assert [a.get_title() for a in figure.axes] == [
        "Question answering",
        "Multiple choice",
        "Answer log-perplexity",
    ]
    assert qa.get_ylabel() == "Exact match (higher is better)"
    assert perplexity.get_ylabel().endswith("(lower is better)")
    lines = {line.get_label(): line for line in qa.get_lines()}
    assert list(lines["no context (no KV cache)"].get_ydata()) == [0.0, 0.0]  # not F1's 0.67
    assert set(lines["cartridge"].get_ydata()) == {0.25}  # exact match, not token F1 (0.5)
    assert set(choice.get_lines()[1].get_ydata()) == {0.5}  # option accuracy as it is


def test_the_memory_axis_ticks_the_measured_sizes_without_minor_labels(figure):
    measured = {p * BYTES_PER_TOKEN for p in (8, 9, 10, 11, 12, 16, 66, ICL_TOKENS)}
    renderer = figure.canvas.get_renderer()
    for axis in figure.axes:
        ticks = list(axis.get_xticks())
        assert set(ticks) <= measured and ICL_TOKENS * BYTES_PER_TOKEN in ticks
        assert len(axis.xaxis.get_minorticklocs()) == 0
        labels = [t for t in axis.get_xticklabels() if t.get_text()]
        assert len(labels) == len(ticks) and all("KiB\n" in t.get_text() for t in labels)
        assert labels[-1].get_text().endswith("\n1\u00d7")  # ICL: no compression
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def test_point_labels_of_close_points_do_not_overlap(figure):
    renderer = figure.canvas.get_renderer()
    for axis in figure.axes:
        labels = [t for t in axis.texts if isinstance(t, Annotation)]
        named = {t.get_text() for t in labels}
        cartridges = {f"cartridge_p{p}" for p in (8, 9, 10, 11, 12, 16)}
        assert named == cartridges | {"composition"}  # every cartridge is named, once
        boxes = [label_box(t, renderer) for t in labels]
        for (a, box_a), (b, box_b) in itertools.combinations(zip(labels, boxes, strict=True), 2):
            assert not box_a.overlaps(box_b), (a.get_text(), b.get_text())
        page = figure.bbox
        assert all(page.contains(b.x0, b.y0) and page.contains(b.x1, b.y1) for b in boxes)


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(48 * 1024) == "48 KiB"
    assert human_bytes(1.5 * 1024**2) == "1.5 MiB"
    assert human_bytes(1000 * 1024**2) == "1000 MiB"
    assert human_bytes(3 * 1024**4) == "3 TiB"


def test_document_cartridges_are_points_named_with_their_questions():
    rows = report()
    documents = rows[rows["method"] == "cartridge_p8"].assign(
        method="document_a", kind="document_cartridge", questions="a"
    )
    composed = rows[rows["method"] == "composition"].assign(questions="a+b")
    rows = pd.concat([rows[rows["method"] != "composition"], documents, composed])
    figure = tradeoff_figure(rows)
    qa = figure.axes[0]
    named = {t.get_text() for t in qa.texts if isinstance(t, Annotation)}
    assert {"document_a", "composition (questions: a+b)"} <= named
    lines = {line.get_label(): line for line in qa.get_lines()}
    assert lines["cartridge of one document"].get_linestyle() == "None"  # not joined
    assert lines["cartridge"].get_linestyle() == "-"
