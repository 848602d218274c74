"""Anarchic FL benchmark: FedAvg, FedBuff, MIFA, AFA-CD, AFA-CS on scikit-learn digits.

Part 1 (accuracy): softmax regression and a small MLP, 100 workers, Dirichlet α ∈ {0.1, 1.0},
(per-worker label mix, Hsu et al. 2019), skewed label-correlated participation (p_i = β·minlabel_i/9 + 1 − β, β = 0.9), worker-chosen
local steps K ~ U{1..10}, log-normal speeds (σ = 0.5, staleness emerges), 3 seeds, 300 server
steps. Every algorithm consumes about 10 uploads per server step (FedAvg cohort 10, FedBuff
K_b = 10, AFA-CD m = 10, AFA-CS min_new = 10, "MIFA 10/round" 10 of the available devices)
except "MIFA", which uses every available worker per round as published (≈ 3.5× the uploads);
"AFA-CS warm" fills every memory slot at x_0 before the first step (``cs_init="warm_start"``)
and "AFA-CS warm τ∞" also accepts every upload however stale (no delay bound);
the tables therefore also give accuracy at equal numbers of uploads. A reference row runs
AFA-CD under uniform participation (every p_i = the mean of the skewed ones). Per-class test
accuracy gives the participation bias: the gap between classes 5–9 and 0–4 (workers holding
low digits take part rarely) minus that gap under uniform arrivals. Each (row, α, seed) result is
cached as JSON under ``--out``, so a rerun only computes what is missing; ``--jobs`` runs cells
in parallel processes.

"AFA-CS η auto" is AFA-CS with its derived default server step (``server_lr=None``:
η = c(P)/(2P) with P = M/min_new = 10, i.e. 0.245, the rotating-memory stability rule).

Part 1b (cross-silo, the paper's own setting): M = 10 silos, each holding ``p`` classes
(``ClassesPerWorker(p)``, p ∈ {1, 2}), skewed arrival rates (silos whose first class is 0–4
take part with probability 1.0 per tick, the others 0.1: a 10× skew), random K ~ U{1..10},
log-normal speeds, 2 uploads per server step (AFA-CD m = 2, AFA-CS min_new = 2, so P = 5).
Rows: AFA-CD (η = 5), AFA-CS with the derived η (0.477), AFA-CS with η = 5 (over the rule),
AFA-CS with the derived η under randomised restarts (`Restarts(jitter=5, order="random")`),
and AFA-CD under uniform arrivals (every silo at the mean rate) as the unbiased reference.
The claim under test (Yang et al. 2022): AFA-CS beats AFA-CD under skewed arrivals.

Part 2 (throughput): 1,000 workers × 100 server steps of softmax regression with AFA-CD in
the in-process simulator, then the same federation on Flower's simulation engine (Ray,
`run_simulation`, 1,000 SuperNodes, the event-driven AFA loop) for as many steps as fit in
``--flower-budget`` seconds; prints both rates and their ratio.

    python benchmarks/federated_anarchic.py [--quick] [--out outputs/federated_anarchic]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import lifelong.federated as fl

ALGORITHMS = ("FedAvg", "FedBuff", "MIFA", "MIFA 10/round", "AFA-CD", "AFA-CS", "AFA-CS η auto", "AFA-CS warm",
              "AFA-CS warm τ∞", "AFA-CD uniform")
SILO_ROWS = ("AFA-CD", "AFA-CS η auto", "AFA-CS η=5", "AFA-CS η auto, random restarts", "AFA-CD uniform")


def digits() -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    x, y = x[perm], y[perm]
    return TensorDataset(x[:1437], y[:1437]), TensorDataset(x[1437:], y[1437:])


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "logreg":
        return nn.Linear(64, 10)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def make_algorithm(name: str, local_lr: float) -> fl.Server:
    eta = 5.0   # ≈ mean K: AFA's per-step displacement then matches FedAvg's (AFA-CD with η = K is FedAvg)
    if name == "FedAvg":
        return fl.FedAvg(local_lr=local_lr, server_lr=1.0, cohort_size=10)
    if name == "FedBuff":
        return fl.FedBuff(local_lr=local_lr, server_lr=1.0, buffer_size=10)
    if name == "MIFA":
        return fl.MIFA(local_lr=local_lr, server_lr=1.0, min_fraction=0.0)
    if name == "MIFA 10/round":
        return fl.MIFA(local_lr=local_lr, server_lr=1.0, min_fraction=0.0, cohort_size=10)
    if name.startswith("AFA-CD"):
        return fl.AFACD(local_lr=local_lr, server_lr=eta, buffer_size=10)
    if name == "AFA-CS warm":   # every slot filled at x_0 before the first step
        return fl.AFACS(local_lr=local_lr, server_lr=eta, min_new=10, cs_init="warm_start")
    if name == "AFA-CS warm τ∞":   # and no delay bound: no upload is ever dropped
        return fl.AFACS(local_lr=local_lr, server_lr=eta, min_new=10, cs_init="warm_start", max_staleness=None)
    if name == "AFA-CS η auto":   # the derived default step c(P)/(2P), P = 100/10
        return fl.AFACS(local_lr=local_lr, min_new=10)
    return fl.AFACS(local_lr=local_lr, server_lr=eta, min_new=10)


def run_cell(model_kind: str, alpha: float, name: str, seed: int, steps: int) -> dict:
    torch.set_num_threads(1)
    train, test = digits()
    labels = train.tensors[1].numpy()
    partition = fl.Dirichlet(alpha, over="workers")
    parts = partition.split(labels, 100, seed)
    p = fl.label_correlated(labels, parts, beta=0.9)
    if name.endswith("uniform"):
        p = np.full_like(p, p.mean())
    server = make_algorithm(name, 0.1)
    t0 = time.perf_counter()
    res = fl.simulate(
        make_model(model_kind), train, server, num_workers=100, steps=steps, test_data=test,
        partition=partition, participation=fl.Bernoulli(p), local_steps=fl.UniformSteps(1, 10),
        speed=fl.Speed(sigma=0.5), max_concurrent=20, eval_every=10, eval_groups="labels", seed=seed,
        progress=False)
    memory = {}
    if hasattr(server, "memory_version"):
        ages = [server.version - v for v in server.memory_version.values()]
        memory = {"slots_filled": len(ages), "slot_age_mean": float(np.mean(ages))}
    return {"final_accuracy": res.final_accuracy, "history": res.history, "seconds": time.perf_counter() - t0,
            "dropped_stale": res.dropped_stale, "memory": memory}


def _cell(task):
    if task[0] == "silo":
        return silo_cell(*task[1:])
    return run_cell(*task)


def silo_cell(model_kind: str, classes: int, name: str, seed: int, steps: int) -> dict:
    """One cross-silo run: 10 silos, ``classes`` classes each, 10× skewed arrival rates."""
    import warnings

    torch.set_num_threads(1)
    train, test = digits()
    labels = train.tensors[1].numpy()
    partition = fl.ClassesPerWorker(classes)
    parts = partition.split(labels, 10, seed)
    p = np.array([1.0 if int(np.min(labels[q])) < 5 else 0.1 for q in parts])
    if name.endswith("uniform"):
        p = np.full_like(p, p.mean())
    if name.startswith("AFA-CD"):
        server = fl.AFACD(local_lr=0.1, server_lr=5.0, buffer_size=2)
    else:
        server = fl.AFACS(local_lr=0.1, server_lr=5.0 if "η=5" in name else None, min_new=2)
    restarts = fl.Restarts(jitter=5.0, order="random") if "random" in name else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # η = 5 is over the rule on purpose
        res = fl.simulate(make_model(model_kind), train, server, num_workers=10, steps=steps, test_data=test,
                          partition=partition, participation=fl.Bernoulli(p), local_steps=fl.UniformSteps(1, 10),
                          speed=fl.Speed(sigma=0.5), eval_every=10, eval_groups="labels", seed=seed,
                          restarts=restarts, progress=False)
    return {"final_accuracy": res.final_accuracy, "history": res.history, "seconds": time.perf_counter() - t0,
            "dropped_stale": res.dropped_stale, "server_lr": server.server_step,
            "slot_age_mean": res.slot_age_mean, "slot_age_max": res.slot_age_max,
            "participation": res.participation}


def silo_part(args, out: Path) -> list[str]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    tasks, results = [], {}
    combos = [(m, c) for m in ("logreg", "mlp") for c in (1, 2)]
    for model_kind, classes in combos:
        for name in SILO_ROWS:
            for seed in range(args.seeds):
                safe = name.replace(" ", "_").replace(",", "").replace("=", "")
                path = cells / f"silo_{model_kind}_{classes}_{safe}_{seed}_{args.steps}.json"
                key = (model_kind, classes, name, seed)
                if path.exists():
                    results[key] = json.loads(path.read_text())
                else:
                    tasks.append((path, key))
    print(f"  cross-silo: {len(results)} cached cells, {len(tasks)} to run", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [(pool.submit(_cell, ("silo", *key, args.steps)), path, key) for path, key in tasks]
        for fut, path, key in futures:
            results[key] = fut.result()
            path.write_text(json.dumps(results[key]))
    lines = [f"Cross-silo (10 silos, p classes each, 10× skewed arrivals, K ~ U{{1..10}}, 2 uploads per step): "
             f"test accuracy after {args.steps} server steps, mean ± std over {args.seeds} seeds; *bias* = accuracy "
             "on digits 5–9 (rare silos) minus 0–4 (frequent silos), minus that gap of AFA-CD under uniform arrivals.",
             "", "| model | p | row | η | acc | acc @ half | bias | slot age mean / max |", "|---|---|---|---|---|---|---|---|"]
    for model_kind, classes in combos:
        ref = np.mean([class_gap(results[(model_kind, classes, "AFA-CD uniform", s)]) for s in range(args.seeds)])
        for name in SILO_ROWS:
            runs = [results[(model_kind, classes, name, s)] for s in range(args.seeds)]
            final = [r["final_accuracy"] for r in runs]
            half = [[h["accuracy"] for h in r["history"] if h["step"] <= args.steps // 2][-1] for r in runs]
            gap = np.mean([class_gap(r) for r in runs]) - ref
            ages = [r["slot_age_mean"] for r in runs if r.get("slot_age_mean") is not None]
            age = (f"{np.mean(ages):.1f} / {max(r['slot_age_max'] for r in runs)}" if ages else "")
            lines.append(f"| {model_kind} | {classes} | {name} | {runs[0]['server_lr']:.3g} | "
                         f"{np.mean(final):.3f} ± {np.std(final):.3f} | {np.mean(half):.3f} | {gap:+.3f} | {age} |")
    return lines


def accuracy_part(args, out: Path) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    tasks, results = [], {}
    for model_kind in ("logreg", "mlp"):
        for alpha in (0.1, 1.0):
            for name in ALGORITHMS:
                for seed in range(args.seeds):
                    safe = name.replace(" ", "_").replace("/", "-").replace("τ∞", "tau-inf")
                    path = cells / f"{model_kind}_{alpha}_{safe}_{seed}_{args.steps}.json"
                    key = (model_kind, alpha, name, seed)
                    if path.exists():
                        results[key] = json.loads(path.read_text())
                    else:
                        tasks.append((path, key))
    print(f"  {len(results)} cached cells, {len(tasks)} to run", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [(pool.submit(_cell, (*key, args.steps)), path, key) for path, key in tasks]
        for fut, path, key in futures:
            results[key] = fut.result()
            path.write_text(json.dumps(results[key]))
    rows = []
    for model_kind in ("logreg", "mlp"):
        for alpha in (0.1, 1.0):
            for name in ALGORITHMS:
                runs = [results[(model_kind, alpha, name, s)] for s in range(args.seeds)]
                finals = [r["final_accuracy"] for r in runs]
                row = {"model": model_kind, "alpha": alpha, "algorithm": name,
                       "acc_mean": float(np.mean(finals)), "acc_std": float(np.std(finals)),
                       "curves": [[(h["step"], h["accuracy"]) for h in r["history"]] for r in runs],
                       "runs": runs}
                rows.append(row)
                print(f"  {model_kind:6s} α={alpha:<4} {name:14s} {row['acc_mean']:.3f} ± "
                      f"{row['acc_std']:.3f}", flush=True)
    return rows


def at_uploads(history: list[dict], uploads: int) -> float:
    """Accuracy at the last evaluation that had received at most ``uploads`` uploads."""
    acc = float("nan")
    for h in history:
        if h["updates_received"] <= uploads:
            acc = h["accuracy"]
    return acc


def class_gap(run: dict) -> float:
    """Mean accuracy on digits 5–9 minus on digits 0–4 at the end."""
    g = run["history"][-1]["group_accuracy"]
    return float(np.mean([g[str(c)] for c in range(5, 10)]) - np.mean([g[str(c)] for c in range(5)]))


def throughput_inprocess(train, test, steps: int) -> tuple[float, fl.SimulationResult]:
    start = time.perf_counter()
    res = fl.simulate(make_model("logreg"), train, fl.AFACD(local_lr=0.1, server_lr=5.0, buffer_size=10),
                      num_workers=1000, steps=steps, test_data=test, partition=fl.IID(),
                      participation=fl.Bernoulli(0.5), local_steps=fl.UniformSteps(1, 10),
                      speed=fl.Speed(sigma=0.5), max_concurrent=100, eval_every=steps,
                      seed=0, progress=False)
    return time.perf_counter() - start, res


def throughput_flower(train, budget: float, max_steps: int) -> dict:
    """The same federation on Flower's Ray simulation engine, for at most ``budget`` seconds."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from lifelong.federated.flower import FlowerWorker, make_client_app, run_async

    x, y = train.tensors
    parts = fl.IID().split(y.numpy(), 1000, 0)
    def data_fn(p: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.array(parts[p])   # a writable copy: Ray hands actors read-only arrays
        return x[idx], y[idx]

    worker = FlowerWorker(lambda: make_model("logreg"), data_fn, participation=0.5)
    out: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        server = fl.AFACD(local_lr=0.1, server_lr=5.0, buffer_size=10)
        server.init(fl.trainable_params(make_model("logreg")), 1000)
        t0 = time.perf_counter()
        out.update(run_async(grid, server, num_steps=max_steps, concurrency=100, max_local_steps=10,
                             poll_interval=0.01, timeout=budget, min_nodes=1000))
        out["loop_seconds"] = time.perf_counter() - t0

    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=make_client_app(worker), num_supernodes=1000,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    out["total_seconds"] = time.perf_counter() - start
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["model"], r["alpha"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 3.6), squeeze=False)
    for ax, (model, alpha) in zip(axes[0], combos):
        for r in rows:
            if (r["model"], r["alpha"]) != (model, alpha):
                continue
            n = min(len(c) for c in r["curves"])
            steps = [s for s, _ in r["curves"][0][:n]]
            acc = np.mean([[a for _, a in c[:n]] for c in r["curves"]], axis=0)
            ax.plot(steps, acc, "--" if r["algorithm"].endswith("uniform") else "-", label=r["algorithm"])
        ax.set_title(f"{model}, Dirichlet α={alpha}")
        ax.set_xlabel("server steps")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/federated_anarchic")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 seed, short Flower run")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--skip-silo", action="store_true")
    parser.add_argument("--flower-budget", type=float, default=180.0)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.flower_budget = 20, 1, 60.0
        args.out = args.out + "_quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    report = ["# Anarchic FL benchmark (digits)", ""]

    if not args.skip_accuracy:
        print("accuracy: 100 workers, skewed participation, K ~ U{1..10}", flush=True)
        rows = accuracy_part(args, out)
        plot(rows, out / "accuracy_vs_steps.png")
        budget = 10 * args.steps // 2
        report += [f"Test accuracy after {args.steps} server steps, mean ± std over {args.seeds} seeds "
                   f"(360 test digits); the second table at equal numbers of uploads received "
                   f"({budget:,} and {2 * budget:,}).", "",
                   "| model | Dirichlet α | " + " | ".join(ALGORITHMS) + " |",
                   "|---|---|" + "---|" * len(ALGORITHMS)]
        pick = {(r["model"], r["alpha"], r["algorithm"]): r for r in rows}
        combos = [(m, a) for m in ("logreg", "mlp") for a in (0.1, 1.0)]
        for model, alpha in combos:
            cells = [f"{pick[(model, alpha, a)]['acc_mean']:.3f} ± {pick[(model, alpha, a)]['acc_std']:.3f}"
                     for a in ALGORITHMS]
            report.append(f"| {model} | {alpha} | " + " | ".join(cells) + " |")
        report += ["", "| model | Dirichlet α | uploads | " + " | ".join(ALGORITHMS) + " |",
                   "|---|---|---|" + "---|" * len(ALGORITHMS)]
        for model, alpha in combos:
            for u in (budget, 2 * budget):
                cells = [f"{np.mean([at_uploads(r['history'], u) for r in pick[(model, alpha, a)]['runs']]):.3f}"
                         for a in ALGORITHMS]
                report.append(f"| {model} | {alpha} | {u:,} | " + " | ".join(cells) + " |")
        report += ["", "Participation bias: accuracy on digits 5–9 minus on digits 0–4 at the end, minus the "
                   "same gap of AFA-CD under uniform arrivals (0 = no bias; mean over seeds). Memory servers: "
                   "slots filled / mean slot age in server steps.", "",
                   "| model | Dirichlet α | " + " | ".join(ALGORITHMS) + " |",
                   "|---|---|" + "---|" * len(ALGORITHMS)]
        for model, alpha in combos:
            ref = np.mean([class_gap(r) for r in pick[(model, alpha, "AFA-CD uniform")]["runs"]])
            cells = []
            for a in ALGORITHMS:
                runs = pick[(model, alpha, a)]["runs"]
                cell = f"{np.mean([class_gap(r) for r in runs]) - ref:+.3f}"
                mems = [r["memory"] for r in runs if r.get("memory")]
                if mems:
                    cell += (f" ({np.mean([m['slots_filled'] for m in mems]):.0f} / "
                             f"{np.mean([m['slot_age_mean'] for m in mems]):.0f})")
                cells.append(cell)
            report.append(f"| {model} | {alpha} | " + " | ".join(cells) + " |")
        for r in rows:
            r.pop("runs")
        (out / "accuracy.json").write_text(json.dumps(rows))
        report.append("")
    if not args.skip_silo:
        print("cross-silo: 10 silos, p-class splits, 10× skewed arrivals", flush=True)
        report += silo_part(args, out) + [""]

    train, test = digits()
    print("throughput: 1,000 workers × 100 server steps, AFA-CD, softmax regression", flush=True)
    seconds, res = throughput_inprocess(train, test, 100)
    jobs = sum(res.jobs_started)
    report += ["| engine | server steps | wall s | steps / s | uploads received |", "|---|---|---|---|---|",
               f"| lifelong.simulate (in process) | {res.steps} | {seconds:.1f} | "
               f"{res.steps / seconds:.2f} | {res.history[-1]['updates_received']} |"]
    print(f"  in process: {res.steps} steps in {seconds:.1f} s ({jobs} jobs)", flush=True)
    if not args.skip_flower:
        fw = throughput_flower(train, args.flower_budget, 100)
        rate = fw["steps"] / fw["loop_seconds"] if fw.get("steps") else 0.0
        report.append(f"| Flower run_simulation (Ray, 1,000 SuperNodes) | {fw.get('steps', 0)} | "
                      f"{fw['loop_seconds']:.1f} (+{fw['total_seconds'] - fw['loop_seconds']:.1f} "
                      f"start-up) | {rate:.2f} | — |")
        if rate > 0:
            ratio = (res.steps / seconds) / rate
            report += ["", f"In-process simulator is {ratio:.1f}× faster per server step than "
                           "Flower's simulation engine on this machine (AFA loop time only, "
                           "Ray start-up excluded)."]
            print(f"  Flower: {fw['steps']} steps in {fw['loop_seconds']:.1f} s; ratio {ratio:.1f}×")
    text = "\n".join(report) + "\n"
    (out / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
