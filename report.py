"""Reports of an experiment run: ``results.json``, ``report.md`` and PNG plots.

Everything is computed from the finished cells under ``<output>/cells``; files are written
atomically, so an interrupted run never leaves a report that looks complete.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import warnings
from pathlib import Path

import numpy as np

from .files import atomic_write_text, json_text

CONTINUAL_METRICS = ("acc", "forgetting", "bwt", "fwt", "wall_time_s")
FEDERATED_METRICS = ("final_accuracy", "best_accuracy", "uplink_mb", "dropped_stale", "participation_gini", "wall_time_s")
HIGHER_IS_BETTER = {"acc": True, "forgetting": False, "bwt": True, "fwt": True, "wall_time_s": False,
                    "final_accuracy": True, "best_accuracy": True, "uplink_mb": False, "dropped_stale": False,
                    "participation_gini": False}


def summarise(config: dict, cells: list[dict]) -> tuple[dict, dict]:
    """Mean, std and 95 % CI per method and metric over its runs (seeds × orders), and the best
    method per metric."""
    metrics = CONTINUAL_METRICS if config["kind"] == "continual" else FEDERATED_METRICS
    labels = [m["label"] for m in (config["methods"] if config["kind"] == "continual" else config["algorithms"])]
    summary: dict[str, dict] = {}
    for label in labels:
        rows = [c["result"]["metrics"] for c in cells if c["label"] == label]
        summary[label] = {}
        for metric in metrics:
            values = [r[metric] for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]
            summary[label][metric] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
                "ci95": ci95(values),
                "n": len(values),
            }
    best = {}
    for metric in metrics:
        scored = [(s[metric]["mean"], label) for label, s in summary.items() if s[metric]["mean"] is not None]
        if scored:
            best[metric] = (max if HIGHER_IS_BETTER[metric] else min)(scored)[1]
    return summary, best


def ci95(values: list[float]) -> float | None:
    """Half-width of the 95 % confidence interval of the mean: ``t_{0.975, n-1} · s / √n`` (None below 2 runs)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def versions() -> dict:
    import torch

    import lifelong

    return {"lifelong": lifelong.__version__, "torch": torch.__version__, "python": platform.python_version()}


PLOTS_NOTE = {
    "continual": "The plots show the mean over the seeds; the error bars of forgetting.png are ± one standard "
                 "deviation over the seeds.",
    "federated": "The plots show the run of the first seed.",
}


class CorruptCell(ValueError):
    """A cell file that is empty or does not hold a cell record."""


def load_cell(path: Path) -> dict:
    """A finished cell's record; ``CorruptCell`` naming the file when it is empty or corrupt (an
    interrupted copy, a full disk)."""
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        empty = isinstance(err, json.JSONDecodeError) and not err.doc.strip()
        raise CorruptCell(f"cell file {str(path)!r} " + ("is empty" if empty else f"cannot be read ({err})")) from err
    if not (isinstance(cell, dict) and {"label", "seed", "result"} <= set(cell) and isinstance(cell["result"], dict)):
        raise CorruptCell(f"cell file {str(path)!r} does not hold a cell record (label, seed, result)")
    return cell


def read_cells(output: Path) -> list[dict]:
    """Every readable cell under ``<output>/cells``; temporary files of interrupted writes are
    skipped and corrupt files are left out with a warning."""
    cells = []
    for path in sorted(p for p in (output / "cells").glob("*.json") if not p.name.startswith(".")):
        try:
            cells.append(load_cell(path))
        except CorruptCell as err:
            warnings.warn(f"{err}; leaving it out of the report", RuntimeWarning, stacklevel=2)
    return cells


PERCENT_METRICS = ("acc", "forgetting", "bwt", "fwt", "final_accuracy", "best_accuracy")


def format_mean(stats: dict, metric: str) -> str:
    """The mean as the table shows it (accuracies in %, two decimals)."""
    return f"{(100.0 if metric in PERCENT_METRICS else 1.0) * stats['mean']:.2f}"


def format_cell(stats: dict, metric: str) -> str:
    if stats["mean"] is None:
        return "–"
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    spread = stats.get("ci95")
    return f"{format_mean(stats, metric)} ± {scale * (spread or 0.0):.2f}"


def markdown_table(summary: dict, best: dict, metrics: tuple[str, ...]) -> str:
    """One row per method; the best mean of each metric is bold, and so is every mean tied with it
    as shown (equal at the table's two decimals)."""
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for label, stats in summary.items():
        cells = [("**" + format_cell(stats[m], m) + "**") if is_best(summary, best, label, m) else format_cell(stats[m], m)
                 for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def is_best(summary: dict, best: dict, label: str, metric: str) -> bool:
    """``label``'s mean of ``metric`` is the best one, or equal to it as the table shows it."""
    if metric not in best or summary[label][metric]["mean"] is None:
        return False
    return format_mean(summary[label][metric], metric) == format_mean(summary[best[metric]][metric], metric)


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def pyplot():
    """matplotlib's ``pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seeds_note(seeds: int) -> str:
    return f"mean over {seeds} seed{'s' if seeds != 1 else ''}"


def continual_plots(output: Path, config: dict, cells: list[dict]) -> list[str]:
    """The accuracy matrix heatmaps, accuracy over the stream and forgetting, each averaged over seeds."""
    plt = pyplot()
    labels = [m["label"] for m in config["methods"]]
    mean_matrix = {label: mean_accuracy_matrix([c for c in cells if c["label"] == label]) for label in labels}
    seeds = len(config["seeds"])
    summary, _ = summarise(config, cells)
    figures = {
        "accuracy_matrix.png": accuracy_matrix_figure(mean_matrix, task_names(cells), seeds),
        "accuracy_over_stream.png": accuracy_over_stream_figure(mean_matrix, seeds),
        "forgetting.png": forgetting_figure(summary, labels, seeds),
    }
    for name, fig in figures.items():
        save_figure(fig, output / name)
        plt.close(fig)
    return list(figures)


def mean_accuracy_matrix(cells: list[dict]) -> np.ndarray:
    """The accuracy matrices of one method's cells averaged over seeds (None/NaN: not measured)."""
    mats = [np.array(c["result"]["accuracy_matrix"], dtype=float) for c in cells]
    with warnings.catch_warnings():  # cells no seed measured (forward_transfer=False) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(mats), axis=0)


def task_names(cells: list[dict]) -> list[str] | None:
    """The task names the cells were run with (``task_names`` of a cell record), if any."""
    for cell in cells:
        names = cell["result"].get("task_names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


def accuracy_matrix_figure(mean_matrix: dict[str, np.ndarray], names: list[str] | None, seeds: int):
    """One heatmap per method (accuracy in %, tasks by name) with a shared colour bar."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(mean_matrix), figsize=(3.4 * len(mean_matrix) + 1.5, 3.8), squeeze=False,
                             sharey=True, layout="constrained")
    image = None
    for k, (ax, (label, matrix)) in enumerate(zip(axes[0], mean_matrix.items())):
        n = matrix.shape[0]
        ticks = names if names is not None and len(names) == n else [str(t + 1) for t in range(n)]
        image = ax.imshow(100 * matrix, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(n), ticks, rotation=45, ha="right")
        ax.set_yticks(range(n), ticks)
        if n <= 10:
            for (i, j), value in np.ndenumerate(matrix):
                if not np.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 else "black")
        ax.set_title(f"{label} ({seeds_note(seeds)})", fontsize=9)
        ax.set_xlabel("evaluated task")
        if k == 0:
            ax.set_ylabel("after training task")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy (%)", shrink=0.8)
    return fig


def accuracy_over_stream_figure(mean_matrix: dict[str, np.ndarray], seeds: int | None = None):
    """Mean accuracy on the tasks seen so far after each task, one line per method; the x-axis
    counts tasks, so its ticks are integers."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, m in mean_matrix.items():
        seen = [np.nanmean(m[i, : i + 1]) for i in range(m.shape[0])]
        ax.plot(range(1, len(seen) + 1), seen, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("mean accuracy on tasks seen")
    if seeds is not None:
        ax.set_title(seeds_note(seeds))
    ax.legend()
    return fig


def forgetting_figure(summary: dict, labels: list[str], seeds: int):
    """Average forgetting per method in % (as the table), with ± one standard deviation over seeds."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    stats = [summary[label]["forgetting"] for label in labels]
    means = [100 * (s["mean"] or 0.0) for s in stats]
    stds = [100 * (s["std"] or 0.0) for s in stats]
    ax.bar(labels, means, yerr=stds if seeds > 1 else None, capsize=4)
    ax.set_ylabel("average forgetting (%)")
    bars = "error bars: ± 1 standard deviation over seeds" if seeds > 1 else "one seed: no error bars"
    ax.set_title(f"{seeds_note(seeds)}; {bars}", fontsize=9)
    return fig


def federated_plots(output: Path, config: dict, cells: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [m["label"] for m in config["algorithms"]]
    first_seed = config["seeds"][0]
    runs = {c["label"]: c["result"] for c in cells if c["seed"] == first_seed}
    names = []
    for x_key, x_label, file in (("step", "server steps", "accuracy_vs_steps.png"),
                                 ("uplink_bytes", "uplink MB", "accuracy_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in labels:
            history = [h for h in runs[label]["history"] if h.get("accuracy") is not None]
            xs = [h[x_key] / (2**20 if x_key == "uplink_bytes" else 1) for h in history]
            ax.plot(xs, [h["accuracy"] for h in history], label=label)
        if x_key == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        ax.legend()
        save_figure(fig, output / file)
        plt.close(fig)
        names.append(file)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        hist = {int(k): v for k, v in runs[label]["staleness_histogram"].items()}
        if hist:
            ax.bar(np.array(sorted(hist)) + 0.15 * labels.index(label), [hist[k] for k in sorted(hist)],
                   width=0.15, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("staleness τ of consumed updates")
    ax.set_ylabel("count")
    ax.legend()
    save_figure(fig, output / "staleness.png")
    plt.close(fig)
    names.append("staleness.png")
    return names


def orders_note(config: dict) -> str:
    orders = config.get("orders")
    return f"; {len(orders)} task orders ({'; '.join(map(str, orders))})" if orders else ""


def write_report(output: Path, config: dict, cells: list[dict] | None = None) -> dict:
    """Write ``results.json``, ``report.md`` and the plots from ``cells`` (default: read them from
    ``<output>/cells``)."""
    cells = read_cells(output) if cells is None else cells
    summary, best = summarise(config, cells)
    metrics = CONTINUAL_METRICS if config["kind"] == "continual" else FEDERATED_METRICS
    plots = (continual_plots if config["kind"] == "continual" else federated_plots)(output, config, cells)
    results = {"config": config, "versions": versions(), "summary": summary, "best": best, "cells": cells}
    atomic_write_text(str(output / "results.json"), json_text(results, indent=2))
    table = markdown_table(summary, best, metrics)
    seeds = ", ".join(map(str, config["seeds"]))
    text = [f"# {config['name']}", "",
            f"Kind: {config['kind']}; seeds: {seeds}{orders_note(config)}; mean ± half-width of the 95 % confidence "
            "interval (Student t) over all runs (accuracies in %; ± 0.00 with a single run). "
            "Bold: best per metric (every method tied with it at the shown precision too).", "", table, "",
            PLOTS_NOTE[config["kind"]], ""]
    text += [f"![{p}]({p})" for p in plots]
    atomic_write_text(str(output / "report.md"), "\n".join(text) + "\n")
    print("\n" + table)
    return results
