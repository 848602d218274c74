"""The report: heatmaps label tasks by name with a colour bar, forgetting in % as the table, the
plots say they average seeds and what the error bars are, and every row tied for the best is bold."""

from __future__ import annotations

import numpy as np
import pytest

from lifelong import report

CONFIG = {"kind": "continual", "name": "t", "seeds": [0, 1],
          "methods": [{"label": "a"}, {"label": "b"}, {"label": "c"}]}


def cell(label: str, seed: int, acc: float, forgetting: float, names: list[str] | None = None) -> dict:
    result = {"accuracy_matrix": [[0.9, float("nan")], [0.6, 0.8]],
              "metrics": {"acc": acc, "forgetting": forgetting, "bwt": -forgetting, "fwt": None, "wall_time_s": 1.0}}
    if names is not None:
        result["task_names"] = names
    return {"label": label, "seed": seed, "result": result}


CELLS = [cell("a", 0, 0.801, 0.10, ["ag_news", "imdb"]), cell("a", 1, 0.799, 0.20, ["ag_news", "imdb"]),
         cell("b", 0, 0.80004, 0.30), cell("b", 1, 0.79996, 0.30), cell("c", 0, 0.5, 0.0), cell("c", 1, 0.4, 0.0)]


def test_an_acc_tie_bolds_every_tied_row() -> None:
    summary, best = report.summarise(CONFIG, CELLS)
    table = report.markdown_table(summary, best, ("acc", "forgetting"))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    # ± the 95 % CI half-width over the two runs: t(0.975, 1) · s / √2
    assert "**80.00 ± 1.27**" in rows["a"] and "**80.00 ± 0.05**" in rows["b"], table
    assert "**" not in rows["c"].split("|")[2], "a lower ACC is not bold"
    assert "**0.00 ± 0.00**" in rows["c"] and rows["a"].count("**") == 2


def test_the_heatmap_labels_tasks_by_name_and_has_a_colour_bar() -> None:
    mean = {label: report.mean_accuracy_matrix([c for c in CELLS if c["label"] == label]) for label in "abc"}
    fig = report.accuracy_matrix_figure(mean, report.task_names(CELLS), seeds=2)
    heatmaps, colorbar = fig.axes[:3], fig.axes[3:]
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == ["ag_news", "imdb"]
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == ["ag_news", "imdb"]
    assert len(colorbar) == 1 and colorbar[0].get_ylabel() == "accuracy (%)"
    assert heatmaps[0].get_title() == "a (mean over 2 seeds)"
    assert heatmaps[0].images[0].get_array()[1, 0] == pytest.approx(60.0)


def test_heatmap_ticks_fall_back_to_numbers_without_names() -> None:
    fig = report.accuracy_matrix_figure({"b": np.full((2, 2), 0.5)}, None, seeds=1)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2"]
    assert fig.axes[0].get_title() == "b (mean over 1 seed)"


def test_forgetting_is_in_percent_and_says_what_the_error_bars_are() -> None:
    summary, _ = report.summarise(CONFIG, CELLS)
    fig = report.forgetting_figure(summary, ["a", "b", "c"], seeds=2)
    ax = fig.axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [15.0, 30.0, 0.0]
    assert ax.get_ylabel() == "average forgetting (%)"
    assert ax.get_title() == "mean over 2 seeds; error bars: ± 1 standard deviation over seeds"
    one = report.forgetting_figure(summary, ["a"], seeds=1)
    assert one.axes[0].get_title() == "mean over 1 seed; one seed: no error bars"


def test_the_report_says_the_plots_average_seeds(tmp_path) -> None:
    report.write_report(tmp_path, CONFIG, CELLS)
    text = (tmp_path / "report.md").read_text()
    assert "The plots show the mean over the seeds" in text and "± one standard deviation" in text
    assert "tied with it" in text


def test_digits_streams_name_tasks_by_their_classes() -> None:
    from lifelong.continual import permuted_digits, split_digits
    from lifelong.experiment import stream_task_names

    assert stream_task_names(split_digits(n_tasks=2)) == ["classes 0–4", "classes 5–9"]
    assert stream_task_names(split_digits(n_tasks=5, class_order=[9, 1, 2, 3, 4, 5, 6, 7, 8, 0]))[0] == "classes 1, 9"
    assert stream_task_names(permuted_digits(n_tasks=2)) == ["task 1", "task 2"]


def test_the_table_reports_a_95_percent_confidence_interval() -> None:
    summary, _ = report.summarise(CONFIG, CELLS)
    # c: acc 0.5 and 0.4 → s = 0.0707, t(0.975, 1) = 12.706 → half-width 12.706 · 0.0707 / √2 = 0.635
    assert summary["c"]["acc"]["ci95"] == pytest.approx(12.7062 * 0.070711 / 2 ** 0.5, rel=1e-4)
    assert report.ci95([0.5]) is None
