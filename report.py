"""Reports of an experiment run: ``results.json``, ``report.md`` and PNG plots.

Everything is computed from the finished cells under ``<output>/cells``; files are written
atomically, so an interrupted run never leaves a report that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .files import atomic_write_text
from .experiment import CONTINUAL_METRICS, FEDERATED_METRICS, summarise, versions


def read_cells(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((output / "cells").glob("*.json"))]


def format_cell(stats: dict, metric: str) -> str:
    if stats["mean"] is None:
        return "–"
    scale = 100.0 if metric in ("acc", "forgetting", "bwt", "fwt", "final_accuracy", "best_accuracy") else 1.0
    return f"{scale * stats['mean']:.2f} ± {scale * stats['std']:.2f}"


def markdown_table(summary: dict, best: dict, metrics: tuple[str, ...]) -> str:
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for label, stats in summary.items():
        cells = [("**" + format_cell(stats[m], m) + "**") if best.get(m) == label else format_cell(stats[m], m)
                 for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def continual_plots(output: Path, config: dict, cells: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    labels = [m["label"] for m in config["methods"]]
    mean_matrix = {}
    for label in labels:
        mats = [np.array(c["result"]["accuracy_matrix"], dtype=float) for c in cells if c["label"] == label]
        mean_matrix[label] = np.nanmean(np.stack(mats), axis=0)
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3), squeeze=False)
    for ax, label in zip(axes[0], labels):
        matrix = mean_matrix[label]
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ticks = range(matrix.shape[0])
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        if matrix.shape[0] <= 10:
            for (i, j), value in np.ndenumerate(matrix):
                if not np.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 else "black")
        ax.set_title(label)
        ax.set_xlabel("evaluated task j")
        ax.set_ylabel("after training task i")
    fig.tight_layout()
    save_figure(fig, output / "accuracy_matrix.png")
    plt.close(fig)
    names.append("accuracy_matrix.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        m = mean_matrix[label]
        seen = [np.nanmean(m[i, : i + 1]) for i in range(m.shape[0])]
        ax.plot(range(1, len(seen) + 1), seen, marker="o", label=label)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("mean accuracy on tasks seen")
    ax.legend()
    save_figure(fig, output / "accuracy_over_stream.png")
    plt.close(fig)
    names.append("accuracy_over_stream.png")
    summary, _ = summarise(config, cells)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    means = [summary[label]["forgetting"]["mean"] or 0.0 for label in labels]
    stds = [summary[label]["forgetting"]["std"] or 0.0 for label in labels]
    ax.bar(labels, means, yerr=stds, capsize=4)
    ax.set_ylabel("average forgetting")
    save_figure(fig, output / "forgetting.png")
    plt.close(fig)
    names.append("forgetting.png")
    return names


def federated_plots(output: Path, config: dict, cells: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_xlabel("staleness τ of consumed updates")
    ax.set_ylabel("count")
    ax.legend()
    save_figure(fig, output / "staleness.png")
    plt.close(fig)
    names.append("staleness.png")
    return names


def write_report(output: Path, config: dict) -> dict:
    cells = read_cells(output)
    summary, best = summarise(config, cells)
    metrics = CONTINUAL_METRICS if config["kind"] == "continual" else FEDERATED_METRICS
    plots = (continual_plots if config["kind"] == "continual" else federated_plots)(output, config, cells)
    results = {"config": config, "versions": versions(), "summary": summary, "best": best, "cells": cells}
    atomic_write_text(str(output / "results.json"), json.dumps(results, indent=2, default=str))
    table = markdown_table(summary, best, metrics)
    seeds = ", ".join(map(str, config["seeds"]))
    text = [f"# {config['name']}", "",
            f"Kind: {config['kind']}; seeds: {seeds}; mean ± std over seeds (accuracies in %). "
            "Bold: best per metric.", "", table, ""]
    text += [f"![{p}]({p})" for p in plots]
    atomic_write_text(str(output / "report.md"), "\n".join(text) + "\n")
    print("\n" + table)
    return results
