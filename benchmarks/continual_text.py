"""The flagship continual-text benchmark: MiniLM through real text tasks, every standard row, tuned.

Protocol (defaults; every one is a flag): all-MiniLM-L6-v2 (22M parameters, ``lifelong.models``)
with a linear head on the mean-pooled tokens, through AG News → Amazon → SST-2 → IMDB (and a
second order) of the shared CL_Benchmark folder, ``--per-class`` training and ``--test-per-class``
test examples per class drawn per seed (stratified), ``--max-length`` tokens, batch 16, Adam,
``--epochs`` passes per task, in two scenarios:

* ``class-incremental``: one head over the 13 global classes, no task id at test time;
* ``task-incremental``: each task's logits restricted to its own classes (the task id is given).

Rows (``--rows``; keys as in results.json): ``naive`` full fine-tuning; ``seqlora`` one shared LoRA
(r = 8 on query/value); ``inclora`` a new LoRA per task, earlier ones frozen, all active;
``olora`` O-LoRA on IncLoRA; ``migu_lora`` / ``migu_olora`` MIGU on the shared LoRA and on O-LoRA;
``kore_seq`` / ``corda_seq`` KORE and CorDA-KPM sequential (r = 8, calibrated on earlier tasks,
merged between tasks); ``osf`` PEFT's OSF through ``osf_factory``; ``classp``, ``powerlaw``,
``ewc``, ``lwf``, ``replay`` on the shared LoRA; ``kcl`` / ``gkcl`` kernel continual learning on a
tensor stream of *frozen* MiniLM mean-pooled features with a small trainable MLP feature extractor
(task-incremental only: KCL needs the task id); ``per_task_lora`` one LoRA per task routed by
content (``task_inference="prototype"``); ``per_task_ft`` per-task full fine-tuning (the task id
picks the weights: an oracle reference); ``joint`` multi-task LoRA training (the upper bound).

Tuning: each row's learning rate and one main knob are chosen on a validation split (held out of
the training files) of the first two tasks of the first order, class-incremental (KCL/GKCL:
task-incremental), seed 0, from a stated grid of the same size (``GRID_POINTS``) for every row, at
the same epochs; the chosen values are printed in the table.

    python benchmarks/continual_text.py --folder ../shared/data/cl_benchmark --out runs/continual_text
    python benchmarks/continual_text.py --speed          # bf16 / length buckets / compile vs fp32; PEFT loop

Every (row, scenario, order, seed) cell and every tuning cell is cached as JSON under ``--out``, so
a rerun resumes per cell. ``--out/results.json`` lists the cells; the markdown report (tables,
verdicts) goes to ``--md`` and the accuracy plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "cl_benchmark"
RESULTS_MD = HERE / "continual_text_results.md"
PLOT = HERE / "continual_text_acc.png"
DEFAULT_TASKS = ["agnews", "amazon", "SST-2", "IMDB"]
SCENARIOS = ("class-incremental", "task-incremental")
LORA = {"r": 8, "target_modules": ["query", "value"]}
HIDDEN = 384  # MiniLM's width
GRID_POINTS = 4  # every row's tuning budget: four (lr, knob) points
# the rows that also run task-incremental (default: every row; a shorter list cuts the budget)
TI_ROWS = None


# ---- the rows ------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One table row: how to build its run from a hyper-parameter point ``hp`` (``lr`` and one knob)."""

    key: str
    label: str
    kind: str  # "text" (run_stream on the text stream) or "features" (KCL/GKCL on frozen features)
    grid: list[dict]
    build: Callable[[dict, dict], dict]  # (hp, context) -> run_stream keywords (+ "method", "full")
    scenarios: tuple[str, ...] = SCENARIOS
    knob: str | None = None
    depends: tuple[str, ...] = ()  # rows whose tuned values this row reuses

    def __post_init__(self) -> None:
        if len(self.grid) != GRID_POINTS:
            raise ValueError(f"row {self.key}: {len(self.grid)} grid points, every row gets {GRID_POINTS}")


def _grid(lrs: list[float], knob: str | None = None, values: list | None = None) -> list[dict]:
    if knob is None:
        return [{"lr": lr} for lr in lrs]
    return [{"lr": lr, knob: v} for lr in lrs for v in values]


ADAPTER_LRS = [3e-4, 1e-3, 3e-3, 1e-2]
TWO_LRS = [1e-3, 3e-3]
HEAD_LR = 1e-2  # the new linear head's Adam rate in every adapter row (full fine-tuning tunes its own)
FT_LRS = [2e-5, 5e-5]


def _lora(method="naive", mode="shared", method_options=None, adapter="lora", options=None, **extra):
    def build(hp: dict, ctx: dict) -> dict:
        opts = method_options(hp, ctx) if callable(method_options) else dict(method_options or {})
        return {"method": method, "method_options": opts or None, "adapter": adapter,
                "adapter_options": dict(options or LORA), "adapter_mode": mode, "lr": hp["lr"],
                "optimizer": split_optimizer(hp["lr"], HEAD_LR), **extra}
    return build


def _full(method="naive"):
    def build(hp: dict, ctx: dict) -> dict:
        return {"method": method, "lr": hp["lr"], "optimizer": split_optimizer(hp["lr"], hp["head_lr"]), "full": True}
    return build


def _osf(hp: dict, ctx: dict) -> dict:
    import lifelong.continual as lc

    return {"method": "naive", "adapter": lc.osf_factory(["query", "value"], num_tasks=ctx["n_tasks"]),
            "adapter_mode": "sequential", "lr": hp["lr"], "optimizer": split_optimizer(hp["lr"], HEAD_LR)}


def _calibrated(name: str, **options):
    def build(hp: dict, ctx: dict) -> dict:
        return {"method": "naive", "adapter": name, "adapter_mode": "sequential", "calibration_samples": 64,
                "adapter_options": {**LORA, "progress": False, **options}, "lr": hp["lr"],
                "optimizer": split_optimizer(hp["lr"], HEAD_LR)}
    return build


def _migu_olora(hp: dict, ctx: dict) -> dict:
    lambda1 = ctx.get("tuned", {}).get("olora", {}).get("lambda1", 0.5)
    return {"method": [{"name": "migu", "options": {"mask_ratio": hp["mask_ratio"]}},
                       {"name": "olora", "options": {"lambda1": lambda1}}],
            "adapter": "lora", "adapter_options": dict(LORA), "adapter_mode": "incremental", "lr": hp["lr"],
            "optimizer": split_optimizer(hp["lr"], HEAD_LR), "fixed": {"lambda1": lambda1}}


def _kernel(method: str):
    def build(hp: dict, ctx: dict) -> dict:
        opts = {"samples_per_class": hp["samples_per_class"]}
        if method == "gkcl":
            opts["gen_epochs"] = 30
        return {"method": method, "method_options": opts, "lr": hp["lr"]}
    return build


ROWS: dict[str, Row] = {r.key: r for r in [
    Row("naive", "Full fine-tuning (naive)", "text", _grid(FT_LRS, "head_lr", [3e-3, 1e-2]), _full(), knob="head_lr"),
    Row("seqlora", "SeqLoRA (shared LoRA, naive)", "text", _grid(ADAPTER_LRS), _lora()),
    Row("inclora", "IncLoRA (LoRA per task, all active)", "text", _grid(ADAPTER_LRS), _lora(mode="incremental")),
    Row("olora", "O-LoRA", "text", _grid(TWO_LRS, "lambda1", [0.1, 0.5]),
        _lora("olora", "incremental", lambda hp, ctx: {"lambda1": hp["lambda1"]}), knob="lambda1"),
    Row("migu_lora", "MIGU on LoRA", "text", _grid(TWO_LRS, "mask_ratio", [0.5, 0.7]),
        _lora("migu", method_options=lambda hp, ctx: {"mask_ratio": hp["mask_ratio"]}), knob="mask_ratio"),
    Row("migu_olora", "MIGU on O-LoRA", "text", _grid(TWO_LRS, "mask_ratio", [0.5, 0.7]), _migu_olora,
        knob="mask_ratio", depends=("olora",)),
    Row("kore_seq", "KORE r=8, sequential", "text", _grid(ADAPTER_LRS), _calibrated("kore")),
    Row("corda_seq", "CorDA-KPM r=8, sequential", "text", _grid(ADAPTER_LRS), _calibrated("corda", mode="kpm")),
    Row("osf", "OSF (PEFT, osf_factory)", "text", _grid([1e-4, 3e-4, 1e-3, 3e-3]), _osf),
    Row("classp", "CLASSP on LoRA", "text", _grid([3e-3, 1e-2], "threshold", [0.0, 1e-7]),
        _lora("classp", method_options=lambda hp, ctx: {"lr": hp["lr"], "threshold": hp["threshold"]}),
        knob="threshold"),
    Row("powerlaw", "Power-law rehearsal on LoRA", "text", _grid(TWO_LRS, "ratio", [0.25, 0.5]),
        _lora("powerlaw", method_options=lambda hp, ctx: {"ratio": hp["ratio"], "seed": ctx["seed"]}), knob="ratio"),
    Row("ewc", "EWC on LoRA", "text", _grid(TWO_LRS, "ewc_lambda", [1e2, 1e4]),
        _lora("ewc", method_options=lambda hp, ctx: {"ewc_lambda": hp["ewc_lambda"]}), knob="ewc_lambda"),
    Row("lwf", "LwF on LoRA", "text", _grid(TWO_LRS, "alpha", [1.0, 4.0]),
        _lora("lwf", method_options=lambda hp, ctx: {"alpha": hp["alpha"]}), knob="alpha"),
    Row("replay", "Replay on LoRA", "text", _grid(TWO_LRS, "mem_size", [50, 100]),
        _lora("replay", method_options=lambda hp, ctx: {"mem_size": hp["mem_size"], "seed": ctx["seed"]}),
        knob="mem_size"),
    Row("kcl", "KCL (frozen MiniLM features + MLP)", "features", _grid([0.01, 0.05], "samples_per_class", [4, 8]),
        _kernel("kcl"), scenarios=("task-incremental",), knob="samples_per_class"),
    Row("gkcl", "GKCL (frozen MiniLM features + MLP)", "features", _grid([0.01, 0.05], "samples_per_class", [4, 8]),
        _kernel("gkcl"), scenarios=("task-incremental",), knob="samples_per_class"),
    Row("per_task_lora", "Per-task LoRA, routed by prototype", "text", _grid(ADAPTER_LRS), _lora(mode="per_task")),
    Row("per_task_ft", "Per-task fine-tuning (task id picks weights)", "text",
        _grid(FT_LRS, "head_lr", [3e-3, 1e-2]), _full("per_task_finetune"), knob="head_lr"),
    Row("joint", "Joint multi-task LoRA (upper bound)", "text", _grid(ADAPTER_LRS), _lora("joint")),
]}


def split_optimizer(lr: float, head_lr: float):
    """Adam with the new linear head (the last two trainable tensors: weight, bias) at ``head_lr``."""
    def make(params):
        import torch

        head, body = params[-2:], params[:-2]
        if not (head[0].dim() == 2 and head[0].shape[1] == HIDDEN and head[1].dim() == 1):
            raise RuntimeError("split_optimizer: the last two trainable tensors are not the linear head")
        return torch.optim.Adam([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}])
    make.__qualname__ = f"adam(body {lr:g}, head {head_lr:g})"
    return make


# ---- data ----------------------------------------------------------------------------------------------------------

def train_per_class(folder, task: str, per_class: int | None, per_task: int | None) -> int:
    """Training examples per class of ``task``: ``per_class``, or ``⌈per_task / classes⌉`` (every task
    then gets about ``per_task`` examples, so a 2-class task gets as many training steps as a 4-class one)."""
    if per_task is None:
        return per_class
    from lifelong.continual.text import find_tasks

    labels = json.loads((find_tasks(folder)[task] / "labels.json").read_text())
    return math.ceil(per_task / len(labels))


def cl_stream(folder, tasks, per_class, test_per_class, seed, scenario, per_task=None):
    """The benchmark stream: each task's sizes from ``per_class`` or ``per_task`` (see train_per_class)."""
    import lifelong.continual as lc

    ti = scenario == "task-incremental"
    if per_task is None:
        return lc.cl_benchmark(folder, tasks, n_train=per_class, n_test=test_per_class, seed=seed, task_incremental=ti)
    parts = [lc.cl_benchmark(folder, [t], n_train=train_per_class(folder, t, per_class, per_task),
                             n_test=test_per_class, seed=seed + 1000 * i) for i, t in enumerate(tasks)]
    specs = []
    for part in parts:
        task, names = part.tasks[0], part.class_names
        specs.append((task.train_texts, [names[c] for c in task.train_labels], task.test_texts,
                      [names[c] for c in task.test_labels], [names[c] for c in task.classes]))
    return lc.text_stream(specs, names=list(tasks), task_incremental=ti)


def validation_stream(folder, tasks, per_class, val_per_class, scenario, seed=0, per_task=None):
    """The first tasks' training files only: the training share (``per_class`` or ``per_task``) to train
    on and ``val_per_class`` per class held out to score the grid (the test files are never read)."""
    import lifelong.continual as lc

    sizes = [train_per_class(folder, t, per_class, per_task) for t in tasks]
    parts = [lc.cl_benchmark(folder, [t], n_train=k + val_per_class, n_test=1, seed=10_000 + seed + 1000 * i)
             for i, (t, k) in enumerate(zip(tasks, sizes))]
    specs = [(p.tasks[0].train_texts, [p.class_names[c] for c in p.tasks[0].train_labels], ["-"], [p.class_names[0]],
              [p.class_names[c] for c in p.tasks[0].classes]) for p in parts]
    full = lc.text_stream(specs, names=list(tasks), task_incremental=True)
    return split_validation(full, sizes, scenario, seed)


def split_validation(full, per_class, scenario, seed=0):
    """Split each task's training items per class: ``per_class`` (one number, or one per task) to train,
    the rest as the test set."""
    import numpy as np

    import lifelong.continual as lc

    specs, names = [], []
    rng = np.random.default_rng(seed)
    for i, task in enumerate(full.tasks):
        k = per_class[i] if isinstance(per_class, (list, tuple)) else per_class
        labels = [full.class_names[c] for c in task.classes]
        tr, va = [], []
        for c in task.classes:
            idx = [k for k, y in enumerate(task.train_labels) if y == c]
            idx = [idx[k] for k in rng.permutation(len(idx))]
            tr += idx[:k]
            va += idx[k:]
        text = lambda ids: [task.train_texts[k] for k in ids]  # noqa: E731
        lab = lambda ids: [full.class_names[task.train_labels[k]] for k in ids]  # noqa: E731
        specs.append((text(tr), lab(tr), text(va), lab(va), labels))
        names.append(task.name)
    return lc.text_stream(specs, names=names, task_incremental=scenario == "task-incremental")


_MODEL: dict = {}
_FEATURES: dict = {}


def minilm():
    """A fresh copy of the pretrained MiniLM (loaded once per process) and its tokenizer."""
    import copy

    if "model" not in _MODEL:
        from lifelong.models import load_minilm

        _MODEL["model"], _MODEL["tokenizer"] = load_minilm()
    return copy.deepcopy(_MODEL["model"]), _MODEL["tokenizer"]


def feature_stream(stream, max_length: int, batch: int = 64):
    """The frozen MiniLM's mean-pooled features of every text (no adapter): a tensor benchmark with task ids."""
    import torch

    import lifelong.continual as lc

    key = (stream.fingerprint(), max_length)
    if key in _FEATURES:
        return _FEATURES[key]
    minilm()
    model, tok = _MODEL["model"].eval(), _MODEL["tokenizer"]

    @torch.no_grad()
    def embed(texts):
        out = []
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
        return torch.cat(out)

    train = [(embed(t.train_texts), torch.tensor(t.train_labels)) for t in stream.tasks]
    test = [(embed(t.test_texts), torch.tensor(t.test_labels)) for t in stream.tasks]
    _FEATURES.clear()
    _FEATURES[key] = lc.benchmark_from_tensors(train, test, task_labels=True, scenario="task-incremental")
    return _FEATURES[key]


def mlp(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(HIDDEN, 256), nn.ReLU(), nn.Linear(256, 256))


# ---- one cell -------------------------------------------------------------------------------------------------------

def run_cell(row: Row, hp: dict, stream, scenario: str, seed: int, settings: dict, ctx: dict | None = None) -> dict:
    """Train ``row`` at hyper-parameters ``hp`` through ``stream``; the cell's measurements (JSON values)."""
    import numpy as np
    import torch

    import lifelong.continual as lc

    ctx = {"seed": seed, "n_tasks": len(stream), **(ctx or {})}
    spec = row.build(hp, ctx)
    method = spec.pop("method")
    spec.pop("full", None)
    fixed = spec.pop("fixed", {})
    options = {"method_options": spec.pop("method_options", None)}
    lr = spec.pop("lr")
    common = dict(epochs=settings["epochs"], batch_size=settings["batch_size"], seed=seed, progress=False,
                  forward_transfer=False, eval_batch_size=64)
    torch.manual_seed(seed)
    start = time.perf_counter()
    if row.kind == "features":
        bm = feature_stream(stream, settings["max_length"])
        res = lc.run_stream(mlp(seed), bm, method, lr=lr, **options, **common)
    else:
        model, tok = minilm()
        if spec.get("adapter_mode") == "per_task" and scenario == "class-incremental":
            spec["task_inference"] = "prototype"
        spec.setdefault("optimizer", "adam")
        res = lc.run_stream(model, stream, method, tokenizer=tok, lr=lr, max_length=settings["max_length"],
                            precision=settings["precision"], length_buckets=settings["length_buckets"],
                            **options, **common, **spec)
    wall = time.perf_counter() - start
    held = dict(res.memory)  # per-task and incremental runs report the adapters they keep (stored_adapter_floats)
    out = {"row": row.key, "scenario": scenario, "seed": seed, "hp": {**hp, **fixed},
           "acc": _num(res.acc), "forgetting": _num(res.forgetting), "bwt": _num(res.bwt),
           "matrix": [[_num(a) for a in r] for r in res.accuracy_matrix], "tasks": stream_names(stream),
           "trainable": int(res.trainable_parameters), "memory": held, "wall_time_s": wall,
           "steps": int(res.train_steps), "steps_per_s": 1.0 / res.step_time_s if res.step_time_s > 0 else None}
    for key in ("task_inference_accuracy", "subspace_overlap"):
        if key in res.metrics:
            out[key] = _num(res.metrics[key])
    del res
    return out


def stream_names(stream) -> list[str]:
    return list(getattr(stream, "names", []))


def _num(x):
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


# ---- caching ---------------------------------------------------------------------------------------------------------

def hp_key(hp: dict) -> str:
    return "_".join(f"{k}={hp[k]:g}" if isinstance(hp[k], float) else f"{k}={hp[k]}" for k in sorted(hp))


def cached(path: Path, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The JSON at ``path``, or ``compute()`` written there atomically; and whether it was computed now."""
    if path.is_file():
        return json.loads(path.read_text()), False
    value = compute()
    write_json(path, value)
    return value, True


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


# ---- the benchmark ---------------------------------------------------------------------------------------------------

def tune_scenario(row: Row) -> str:
    return "class-incremental" if "class-incremental" in row.scenarios else "task-incremental"


def tune_path(args, row: Row, hp: dict, chosen: dict) -> Path:
    dep = "_".join(f"{d}-{hp_key({k: v for k, v in chosen[d].items() if k != 'val_acc'})}" for d in row.depends)
    return Path(args.out) / "tune" / f"{row.key}__{hp_key(hp)}{'__' + dep if dep else ''}.json"


def select(rows: list[Row], args, chosen: dict) -> bool:
    """Fill ``chosen`` for every row whose grid is complete in the cache (best validation ACC; the
    first point wins ties); True when every row is chosen."""
    for row in sorted(rows, key=lambda r: len(r.depends)):
        if row.key in chosen or not all(d in chosen for d in row.depends):
            continue
        if not args.tune:
            chosen[row.key] = {**row.grid[0], "val_acc": None}
            continue
        paths = [tune_path(args, row, hp, chosen) for hp in row.grid]
        if not all(p.is_file() for p in paths):
            continue
        cells = [json.loads(p.read_text()) for p in paths]
        best = max(cells, key=lambda c: c["acc"] if c["acc"] is not None else -1.0)  # max keeps the first of ties
        chosen[row.key] = {**best["hp"], "val_acc": best["acc"]}
    return all(r.key in chosen for r in rows)


def pending_tuning(rows: list[Row], args, chosen: dict) -> list[tuple[Row, dict, Path]]:
    """Tuning cells not cached yet, of the rows whose dependencies are chosen."""
    if not args.tune:
        return []
    return [(row, hp, path) for row in rows if row.key not in chosen and all(d in chosen for d in row.depends)
            for hp in row.grid if not (path := tune_path(args, row, hp, chosen)).is_file()]


def cells_of(rows, scenarios, orders, seeds, ti_rows=None):
    """Every (row, scenario, order, seed) cell; task-incremental only for ``ti_rows`` (None: every row)."""
    return [(row, sc, o, s) for sc in scenarios for row in rows if sc in row.scenarios
            and (sc != "task-incremental" or ti_rows is None or row.key in ti_rows)
            for o in range(len(orders)) for s in seeds]


def cell_path(args, row: Row, scenario: str, order: int, seed: int) -> Path:
    return Path(args.out) / "cells" / f"{row.key}__{scenario}__o{order}__s{seed}.json"


def load_cell(path: Path, hp: dict) -> dict | None:
    """A cached cell, unless its hyper-parameters differ from the chosen ones (then it is stale)."""
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    return cell if cell.get("hp") == hp else None


def chosen_hp(chosen: dict, row: Row) -> dict:
    return {k: v for k, v in chosen[row.key].items() if k != "val_acc"}


def work(args, rows, make_stream, make_val, share=(0, 1), bar=None) -> dict:
    """Compute the uncached tuning and main cells (those of worker ``share[0]`` of ``share[1]``); the
    tuned values. Workers split each phase's cells; a phase waits for the previous one (``run_all``)."""
    index, jobs = share
    chosen: dict = {}
    while True:
        select(rows, args, chosen)
        todo = pending_tuning(rows, args, chosen)
        if not todo:
            break
        for k, (row, hp, path) in enumerate(todo):
            if k % jobs == index:
                sc = tune_scenario(row)
                cell, _ = cached(path, lambda: run_cell(row, hp, make_val(sc), sc, 0, vars(args), {"tuned": chosen}))
                log(args, f"tune {row.key} {hp_key(hp)}: val ACC {100 * (cell['acc'] or 0):.1f} "
                          f"({cell['wall_time_s']:.0f} s)")
                if bar is not None:
                    bar.update(1)
        if jobs > 1:
            return chosen  # the parent starts the next phase once every worker is done
    for k, (row, sc, o, seed) in enumerate(cells_of(rows, args.scenarios, args.orders, args.seeds, args.ti_rows)):
        hp = chosen_hp(chosen, row)
        path = cell_path(args, row, sc, o, seed)
        if k % jobs == index and load_cell(path, hp) is None:
            cell = run_cell(row, hp, make_stream(args.orders[o], seed, sc), sc, seed, vars(args), {"tuned": chosen})
            write_json(path, {**cell, "order": o})
            log(args, f"cell {row.key} {sc} order {o} seed {seed}: ACC {100 * (cell['acc'] or 0):.1f} "
                      f"({cell['wall_time_s']:.0f} s)")
            if bar is not None:
                bar.set_postfix_str(f"{row.key} {sc[:5]} o{o} s{seed} acc {100 * (cell['acc'] or 0):.1f}")
        if bar is not None:
            bar.update(1)
    return chosen


def log(args, text: str) -> None:
    if args.worker is not None:
        print(f"[worker {args.worker}] {time.strftime('%H:%M:%S')} {text}", flush=True)


def spawn(args, argv: list[str]) -> None:
    """Run ``args.jobs`` workers of this script on the same arguments (one thread each) and wait."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(i), "--threads", "1",
                               "--no-progress"], env={**os.environ, "HF_HUB_OFFLINE": "1"})
             for i in range(args.jobs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"continual_text: a worker failed (exit codes {codes})")


def run_all(args, make_stream: Callable | None = None, make_val: Callable | None = None,
            argv: list[str] | None = None) -> list[dict]:
    """Tune, then run every (row, scenario, order, seed) cell (cached), write results.json and the report."""
    from tqdm.auto import tqdm

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [ROWS[k] for k in args.rows]
    make_stream = make_stream or (lambda tasks, seed, sc: cl_stream(args.folder, tasks, args.per_class,
                                                                     args.test_per_class, seed, sc, args.per_task))
    make_val = make_val or (lambda sc: validation_stream(args.folder, args.orders[0][:2], args.per_class,
                                                         args.val_per_class, sc, per_task=args.per_task))
    start = time.perf_counter()
    if args.worker is not None:
        work(args, rows, make_stream, make_val, (args.worker, args.jobs))
        return []
    if args.jobs > 1:
        phases = 1 + max(len(r.depends) for r in rows) + 1
        for _ in range(phases):  # tuning phases (rows waiting for other rows' values), then the cells
            spawn(args, argv or sys.argv[1:])
    n_main = len(cells_of(rows, args.scenarios, args.orders, args.seeds, args.ti_rows))
    bar = tqdm(total=(GRID_POINTS * len(rows) if args.tune else 0) + n_main, desc="continual_text", unit="cell",
               disable=not args.progress)
    chosen = work(args, rows, make_stream, make_val, bar=bar)
    bar.close()
    total_s = time.perf_counter() - start
    results = [load_cell(cell_path(args, row, sc, o, seed), chosen_hp(chosen, row))
               for row, sc, o, seed in cells_of(rows, args.scenarios, args.orders, args.seeds, args.ti_rows)]
    write_json(out / "results.json", results)
    tune_cells = [json.loads(tune_path(args, r, hp, chosen).read_text()) for r in rows for hp in r.grid
                  if args.tune]
    began = time.time() - total_s
    files = list((out / "cells").glob("*.json")) + list((out / "tune").glob("*.json"))
    computed = sum(1 for f in files if f.stat().st_mtime >= began)
    previous = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    invocations = previous.get("invocations") or ([{"wall_s": previous["total_s"], "computed_cells": None}]
                                                  if "total_s" in previous else [])
    invocations.append({"wall_s": total_s, "computed_cells": computed})
    meta = {"args": {k: v for k, v in vars(args).items()}, "chosen": chosen, "total_s": total_s,
            "invocations": invocations,
            "tune_s": sum(c["wall_time_s"] for c in tune_cells), "main_s": sum(c["wall_time_s"] for c in results),
            "grids": {r.key: r.grid for r in rows}}
    (out / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    report(results, meta, rows, args)
    return results


# ---- statistics and the report --------------------------------------------------------------------------------------

def t_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval (0 for one value)."""
    from scipy import stats

    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def pct(values, digits: int = 1) -> str:
    mean, half = t_ci(values)
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.{digits}f} ± {100 * half:.{digits}f}"


def by(results, row, scenario):
    return [r for r in results if r["row"] == row and r["scenario"] == scenario]


def paired(results, a: str, b: str, scenario: str, metric: str = "acc"):
    """Paired differences ``a − b`` over the (order, seed) cells both rows ran; (mean, half-width, n)."""
    left = {(r["order"], r["seed"]): r[metric] for r in by(results, a, scenario)}
    right = {(r["order"], r["seed"]): r[metric] for r in by(results, b, scenario)}
    diffs = [left[k] - right[k] for k in sorted(set(left) & set(right))
             if left[k] is not None and right[k] is not None]
    if not diffs:
        return None
    mean, half = t_ci(diffs)
    return mean, half, len(diffs)


def fmt_memory(cells) -> str:
    m = cells[0]["memory"]
    parts = []
    if m.get("replay_samples"):
        parts.append(f"{m['replay_samples']} samples")
    if m.get("coreset_samples"):
        parts.append(f"{m['coreset_samples']} coreset samples")
    kept = m.get("stored_adapter_floats", m.get("adapter_floats", 0))  # adapter_floats: cells of earlier versions
    floats = m.get("stored_floats", 0) + kept + m.get("generator_parameters", 0)
    if floats:
        parts.append(f"{floats / 1e6:.2f} M floats")
    return ", ".join(parts) or "0"


def fmt_hp(hp: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in hp.items() if k != "val_acc")


def table(results, rows, scenario, chosen) -> list[str]:
    lines = [f"| row | ACC % (95 % CI) | forgetting % | BWT % | trainable params | memory held | wall s | steps/s "
             f"| tuned (val ACC %) |", "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for row in rows:
        cells = by(results, row.key, scenario)
        if not cells:
            continue
        note = ""
        if "task_inference_accuracy" in cells[0]:
            note = f"; routing {pct([c['task_inference_accuracy'] for c in cells], 0)} %"
        val = chosen.get(row.key, {}).get("val_acc")
        lines.append(
            f"| {row.label} (`{row.key}`) | {pct([c['acc'] for c in cells])}{note} | "
            f"{pct([c['forgetting'] for c in cells])} | {pct([c['bwt'] for c in cells])} | {cells[0]['trainable']:,} | "
            f"{fmt_memory(cells)} | {statistics.fmean(c['wall_time_s'] for c in cells):.0f} | "
            f"{statistics.fmean(c['steps_per_s'] for c in cells if c['steps_per_s']):.2f} | "
            f"{fmt_hp(chosen.get(row.key, {}))}{f' ({100 * val:.1f})' if val is not None else ''} |")
    return lines


def claim(results, a, b, scenario, metric="acc", sign=1, margin=0.0):
    """(text, verdict) for "a beats b" (sign 1) or "a is lower than b" (sign −1) with an optional
    non-inferiority margin (verdict 'holds' when the CI of sign·(a − b) lies above −margin)."""
    d = paired(results, a, b, scenario, metric)
    if d is None:
        return f"{a} vs {b}: not run", "not run"
    mean, half, n = d
    low, high = sign * mean - half, sign * mean + half
    if n < 2:
        verdict = "inconclusive (one run: no interval)"
    elif low > -margin:
        verdict = "holds"
    elif high < -margin:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    name = {"acc": "ACC", "forgetting": "forgetting", "bwt": "BWT"}[metric]
    ma, mb = t_ci([r[metric] for r in by(results, a, scenario)]), t_ci([r[metric] for r in by(results, b, scenario)])
    return (f"{name} {a} {100 * ma[0]:.1f} ± {100 * ma[1]:.1f} vs {b} {100 * mb[0]:.1f} ± {100 * mb[1]:.1f}; "
            f"paired difference {100 * mean:+.1f} ± {100 * half:.1f} points (n = {n})"), verdict


CLAIMS = [
    ("MIGU improves naive LoRA (MIGU, Du et al. 2024, Table 2)", [("migu_lora", "seqlora", "acc", 1, 0.0)]),
    ("MIGU improves O-LoRA (MIGU Table 2)", [("migu_olora", "olora", "acc", 1, 0.0)]),
    ("O-LoRA beats SeqLoRA and IncLoRA (O-LoRA, Wang et al. 2023, Table 1)",
     [("olora", "seqlora", "acc", 1, 0.0), ("olora", "inclora", "acc", 1, 0.0)]),
    ("KORE / CorDA-KPM sequential forget less than SeqLoRA at equal rank (r = 8)",
     [("kore_seq", "seqlora", "forgetting", -1, 0.0), ("corda_seq", "seqlora", "forgetting", -1, 0.0)]),
    ("CLASSP and power-law rehearsal beat naive (both on the same LoRA as SeqLoRA)",
     [("classp", "seqlora", "acc", 1, 0.0), ("powerlaw", "seqlora", "acc", 1, 0.0)]),
    ("CLASSP and power-law rehearsal (on LoRA) beat naive full fine-tuning",
     [("classp", "naive", "acc", 1, 0.0), ("powerlaw", "naive", "acc", 1, 0.0)]),
    ("GKCL matches KCL's accuracy without storing samples (Derakhshani et al.; margin: within 2 points)",
     [("gkcl", "kcl", "acc", 1, 0.02)]),
    ("Routed per-task adapters approach per-task fine-tuning (margin: within 5 points)",
     [("per_task_lora", "per_task_ft", "acc", 1, 0.05)]),
]


def verdicts(results, scenarios) -> list[str]:
    lines = []
    for title, tests in CLAIMS:
        lines.append(f"- **{title}**")
        for scenario in scenarios:
            for a, b, metric, sign, margin in tests:
                text, verdict = claim(results, a, b, scenario, metric, sign, margin)
                if verdict == "not run":
                    continue
                lines.append(f"  - {scenario}: **{verdict}** — {text}.")
    return lines


def plot(results, rows, scenarios, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [r.key for r in rows if any(by(results, r.key, sc) for sc in scenarios)]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / max(len(scenarios), 1)
    for k, sc in enumerate(scenarios):
        xs, means, halves = [], [], []
        for i, key in enumerate(keys):
            cells = by(results, key, sc)
            if cells:
                m, h = t_ci([c["acc"] for c in cells])
                xs.append(i + (k - (len(scenarios) - 1) / 2) * width)
                means.append(100 * m)
                halves.append(100 * h)
        ax.bar(xs, means, width, yerr=halves, capsize=2, label=sc)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=45, ha="right")
    ax.set_ylabel("ACC after the last task (%), mean ± 95 % CI")
    ax.set_xlabel("row")
    ax.set_title("Continual text benchmark (MiniLM): average accuracy per row and scenario")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results, meta, rows, args) -> str:
    chosen = meta["chosen"]
    scenarios = [sc for sc in args.scenarios if any(r["scenario"] == sc for r in results)]
    n_cells = len(results)
    lines = [f"# Continual text benchmark: MiniLM, {len(args.orders[0])} tasks, class- and task-incremental", "",
             "Generated by `benchmarks/continual_text.py` from its `results.json`; every number below comes from "
             "that file.", "",
             "## Protocol", "",
             f"- Model: all-MiniLM-L6-v2 (22M parameters) + a linear head on the mean-pooled tokens; max_length "
             f"{args.max_length}, batch {args.batch_size}, {args.epochs} epochs per task, Adam (adapter rows: the new head at {HEAD_LR:g}, the adapter at the tuned lr); precision "
             f"{args.precision}, length-bucketed batches {args.length_buckets}.",
             f"- Tasks (orders): " + "; ".join(" → ".join(o) for o in args.orders) + ". "
             + (f"{args.per_class} training examples per class" if args.per_task is None else
                f"{args.per_task} training examples per task (⌈{args.per_task} / classes⌉ per class: a 2-class task "
                f"gets as many steps as a 4-class one)") + f" and {args.test_per_class} test examples per class, "
             f"drawn per seed; seeds {args.seeds}; "
             f"ACC ± half-width of the 95 % t-interval over the {len(args.orders)} orders × {len(args.seeds)} seeds.",
             "- Class-incremental: one head over all classes, no task id at test time. Task-incremental: logits "
             "restricted to the task's classes.",
             f"- Tuning: the first two tasks of the first order, the same training share and {args.val_per_class} "
             f"held-out validation examples per class from the training files (the test files are not read), "
             f"class-incremental (KCL/GKCL: task-incremental), seed 0; {GRID_POINTS} grid points per row, the "
             f"same epochs; the best validation ACC wins. The same values serve both scenarios. Grids: "
             + "; ".join(f"`{r.key}` " + ", ".join(hp_key(h) for h in r.grid) for r in rows) + ".",
             *(["- Task-incremental runs only the rows " + ", ".join(f"`{k}`" for k in args.ti_rows if k in args.rows)
                + " (the other rows ran class-incremental only, to fit the 60-minute budget on 2 cores)."]
               if args.ti_rows is not None else []),
             "- KCL and GKCL run on a tensor stream of **frozen** MiniLM mean-pooled features (not adapted ones) with "
             "a small trainable MLP feature extractor (384→256→256) on top, task-incremental only (KCL's kernel "
             "head needs the task id); GKCL replays samples of a class-conditional VAE instead of a coreset.",
             "- Per-task LoRA: class-incremental routes each test sample to the adapter of the nearest task prototype "
             "of the frozen MiniLM's features (`task_inference=\"prototype\"`; routing accuracy in the ACC column); "
             "task-incremental uses the task id. Per-task fine-tuning always uses the task id (an oracle).",
             "- Memory held: replay/coreset samples kept, plus stored floats (EWC anchors and Fisher, LwF teacher, "
             "per-task weights, stored adapters, GKCL's generator).",
             f"- Cost: {n_cells} cells; compute time of the tuning cells {meta['tune_s']:.0f} s and of the table's "
             f"cells {meta['main_s']:.0f} s ({args.jobs} worker process(es), "
             f"{1 if args.jobs > 1 else args.threads} thread(s) each); wall time of every invocation on this output "
             f"folder: " + ", ".join(f"{i['wall_s']:.0f} s" + ("" if i["computed_cells"] is None else
                                                            f" ({i['computed_cells']} cells computed)")
                                     for i in meta.get("invocations", [])) + ".", ""]
    for sc in scenarios:
        lines += [f"## {sc}", ""] + table(results, rows, sc, chosen) + [""]
    lines += ["## Verdicts", "",
              "A claim **holds** when the 95 % t-interval of the paired difference (same order, seed and data) lies "
              "on the claimed side (beyond the stated margin), **does not hold** when it lies on the other side, "
              "and is **inconclusive** otherwise.", ""] + verdicts(results, scenarios) + [""]
    for extra in sorted(Path(args.out).glob("speed_*.md")) + sorted(Path(args.out).glob("main_job*.md")):
        title = "Speed" if extra.name.startswith("speed") else "Main job"
        lines += [f"## {title} (`{extra.name}`, written by `--speed` / the timing of `make run`)", "",
                  extra.read_text().strip(), ""]
    if args.plot:
        plot(results, rows, scenarios, args.plot)
        lines += [f"![ACC per row]({Path(args.plot).name})", ""]
    text = "\n".join(lines)
    if args.md:
        Path(args.md).write_text(text + "\n")
    (Path(args.out) / "report.md").write_text(text + "\n")
    return text


# ---- speed --------------------------------------------------------------------------------------------------------

def speed(args) -> str:
    """run_stream's steps/s: fp32 vs bf16, length buckets, compile; and a hand-written PEFT loop on the same batches."""
    import torch

    import lifelong.continual as lc
    from lifelong.continual.loop import experience_seed, shuffled_loader
    from lifelong.continual.text_model import unpack_text

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    stream = cl_stream(args.folder, [args.speed_task], args.speed_per_class, 4, 0, "class-incremental")
    rows = []

    def lib(precision="fp32", buckets=False, compile=False):
        model, tok = minilm()
        res = lc.run_stream(model, stream, "naive", tokenizer=tok, adapter="lora", adapter_options=dict(LORA),
                            optimizer="adam", lr=1e-3, epochs=1, batch_size=args.batch_size, seed=0, progress=False,
                            forward_transfer=False, max_length=args.max_length, precision=precision,
                            length_buckets=buckets, compile=compile)
        return res.train_steps / (res.step_time_s * res.train_steps), res.acc

    def hand(precision="fp32"):
        from peft import LoraConfig, get_peft_model

        model, tok = minilm()
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
        head = torch.nn.Linear(HIDDEN, len(stream.class_names))
        bm = stream.to_benchmark(tok, max_length=args.max_length)
        data = bm.train_stream[0].dataset
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.Adam(params, lr=1e-3)
        model.train()
        steps, spent = 0, 0.0
        for batch in shuffled_loader(data, args.batch_size, experience_seed(0, 0)):
            x, y = batch[0], batch[1]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            inputs = unpack_text(x)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                h = model(**inputs).last_hidden_state
                m = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
                logits = head((h * m).sum(1) / m.sum(1).clamp_min(1))
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
            opt.step()
            spent += time.perf_counter() - t0
            steps += 1
        return steps / spent

    configs = [("run_stream fp32 (today's loop)", lambda: lib()),
               ("run_stream bf16", lambda: lib("bf16")),
               ("run_stream fp32 + length buckets", lambda: lib(buckets=True)),
               ("run_stream bf16 + length buckets", lambda: lib("bf16", True)),
               ("hand-written PEFT loop fp32", lambda: (hand(), None)),
               ("hand-written PEFT loop bf16", lambda: (hand("bf16"), None))]
    if args.speed_compile:
        configs.append(("run_stream bf16 + length buckets + compile", lambda: lib("bf16", True, True)))
    measured = {}
    for name, fn in configs:
        try:
            fn()  # warm-up: oneDNN builds its kernels per shape on first use (and compile compiles)
            start = time.perf_counter()
            sps, acc = fn()
            measured[name] = sps
            rows.append((name, f"{sps:.2f}", "–" if acc is None else f"{100 * acc:.1f}",
                         f"{time.perf_counter() - start:.0f}"))
        except Exception as err:  # report what breaks, keep measuring the rest
            rows.append((name, "failed", f"{type(err).__name__}: {str(err)[:80]}", "–"))
        print(rows[-1], flush=True)
    base = measured.get("run_stream fp32 (today's loop)")
    lines = [f"Speed on one task ({args.speed_task}, {args.speed_per_class} examples per class, batch "
             f"{args.batch_size}, max_length {args.max_length}, LoRA r=8 q/v, Adam, {args.threads} threads; each "
             f"loop run once to warm up, then measured on a second run; steps/s = optimizer steps / time inside "
             f"the steps, data loading excluded, as run_stream reports it):", "",
             "| loop | steps/s | × fp32 run_stream | ACC % | wall s |", "|---|---:|---:|---:|---:|"]
    for name, sps, acc, wall in rows:
        ratio = f"{float(sps) / base:.2f}" if base and sps != "failed" else "–"
        lines.append(f"| {name} | {sps} | {ratio} | {acc} | {wall} |")
    for p in ("fp32", "bf16"):
        lib_name = "run_stream fp32 (today's loop)" if p == "fp32" else "run_stream bf16"
        if lib_name in measured and f"hand-written PEFT loop {p}" in measured:
            lines.append(f"\nrun_stream / hand-written PEFT loop ({p}): "
                         f"{measured[lib_name] / measured[f'hand-written PEFT loop {p}']:.2f}×")
    text = "\n".join(lines)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"speed_{args.speed_task}.md").write_text(text + "\n")
    return text


# ---- command line ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(SHARED), help="the CL_Benchmark folder (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help=f"task names of the first order (default: {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--orders", nargs="+", default=None,
                   help="task orders, each a comma-separated list of task names (default: the --tasks order "
                        "and its reverse)")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--ti-rows", nargs="+", default=TI_ROWS, choices=list(ROWS),
                   help="the rows that also run task-incremental (the budget; default: every row)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-class", type=int, default=None,
                   help="training examples per class and task (instead of --per-task)")
    p.add_argument("--per-task", type=int, default=128,
                   help="training examples per task, split evenly over its classes (default: %(default)s)")
    p.add_argument("--test-per-class", type=int, default=16)
    p.add_argument("--val-per-class", type=int, default=16, help="held-out validation examples per class (tuning)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--length-buckets", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                   help="pick each row's point of its grid on the validation split (--no-tune: the first point)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of a single process")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes (one thread each) that split the cells; 1: run in this process")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/continual_text")
    p.add_argument("--md", default=str(RESULTS_MD), help="markdown report ('' for none)")
    p.add_argument("--plot", default=str(PLOT), help="ACC plot ('' for none)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--speed", action="store_true", help="only measure the speed options and the PEFT loop")
    p.add_argument("--speed-per-class", type=int, default=64)
    p.add_argument("--speed-task", default="amazon", help="the task --speed trains on (default: %(default)s)")
    p.add_argument("--speed-compile", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.per_class is not None:
        args.per_task = None
    first = args.tasks or DEFAULT_TASKS
    args.orders = [o.split(",") for o in args.orders] if args.orders else [first, list(reversed(first))]
    args.tasks = args.orders[0]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(args.folder).is_dir():
        sys.exit(f"continual_text: the benchmark folder {args.folder} is absent (pass --folder)")
    if args.speed:
        speed(args)
        return
    results = run_all(args, argv=sys.argv[1:] if argv is None else list(argv))
    if args.worker is not None:
        return
    print(f"{len(results)} cells; results in {Path(args.out) / 'results.json'}"
          + (f", report in {args.md}" if args.md else ""))


if __name__ == "__main__":
    main()
