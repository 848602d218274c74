"""Federated LoRA fine-tuning of the pretrained MiniLM on AG News: FedAvg, FedBuff, MIFA, AFA-CD, AFA-CS.

Setting (every number below is a command-line option):

* data: AG News from the shared CL_Benchmark folder, 250 train / 100 test sentences per class
  (1,000 / 400), at most 48 tokens; 4 classes.
* model: the real all-MiniLM-L6-v2 (22M) with a LoRA adapter (PEFT, r = 8 on query/value of the
  last transformer layer) and a new linear head on the mean-pooled output; only the LoRA and
  head tensors train and travel (55,312 bytes per upload). The five frozen layers below the
  adapter are computed once per sentence (`lifelong.federated.encode_prefix`), so a local step
  runs only the adapted layer (`EncoderTail`); the logits equal those of the full model.
* federation: 100 workers, per-worker label mix ``Dirichlet(α, over="workers")`` with
  α ∈ {0.1, 1.0}; label-skewed participation ``p_i = 0.1 + 0.9·dominant_label_i/3`` (workers
  mostly holding "World" take part with p = 0.1, "Science or Technology" with p = 1.0);
  worker-chosen K ~ U{1..3} per job, log-normal speeds σ = 0.5, at most 20 jobs in flight,
  τ_max = 10 (drop); plain SGD, η_L = 0.3, batch 8.
* rows: every method consumes 5 uploads per server step (FedAvg cohort 5, FedBuff K_b = 5,
  MIFA cohort 5 of the available devices, AFA-CD m = 5, AFA-CS min_new = 5), so server steps
  and uploads are proportional; AFA-CD η = 1 (``--afa-eta``); AFA-CS uses its derived default
  η = c(P)/(2P) = 0.123 (P = M/min_new = 20; ``--afa-cs-eta`` sets it instead). η = mean K = 2, which gives AFA-CD
  FedAvg's step length, diverged to chance accuracy at α = 0.1 for AFA-CD and AFA-CS: AFA applies
  stale uploads (τ up to τ_max = 10) without FedBuff's 1/√(1+τ) discount, so it needs the
  smaller step.
  A reference row runs AFA-CD under *uniform* participation (every p_i = the mean of the skewed
  ones), the arrival process under which AFA-CD is unbiased. A fault row runs AFA-CS with 30% of
  the workers faulty (each job of a faulty worker crashes, or uploads NaN or inf adapter tensors)
  at α = 0.1 for ``--fault-seeds`` seeds, and counts the rejected uploads.

Each (row, α, seed) result is cached as JSON under ``--out``; a rerun only computes what is
missing. Prints the tables and writes ``results.md`` and a plot into ``--out``.

    python benchmarks/federated_text.py [--out runs/federated_text] [--jobs 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROWS = ("FedAvg", "FedBuff", "MIFA", "AFA-CD", "AFA-CS", "AFA-CD uniform")
FAULT_ROW = "AFA-CS 30% faulty"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cl_benchmark"
CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def settings(args) -> dict:
    return {"steps": args.steps, "n_train": args.n_train, "n_test": args.n_test, "max_length": args.max_length,
            "workers": args.workers, "per_step": args.per_step, "k_max": args.k_max, "local_lr": args.local_lr,
            "batch_size": args.batch_size, "rank": args.rank, "eval_every": args.eval_every, "beta": args.beta}


# ---- data cache (computed once, shared by every cell) -----------------------------------------

def build_cache(args, path: Path) -> None:
    import torch

    import lifelong.federated as fl
    from lifelong.continual import cl_benchmark
    from lifelong.models import load_minilm

    torch.set_num_threads(max(1, args.jobs))
    enc, tok = load_minilm()
    stream = cl_benchmark(DATA, tasks=["agnews"], n_train=args.n_train, n_test=args.n_test, seed=0)
    data = fl.text_data(stream, tok, max_length=args.max_length)
    t0 = time.perf_counter()
    train = fl.encode_prefix(enc, data.train.tensors[0], 5)
    test = fl.encode_prefix(enc, data.test.tensors[0], 5)
    torch.save({"train": train, "test": test, "y_train": data.train.tensors[1], "y_test": data.test.tensors[1],
                "class_names": data.class_names, "settings": settings(args),
                "encode_seconds": time.perf_counter() - t0}, path)


def _dataset(inputs: dict, labels):
    """Dict samples (hidden states, mask, label): the form of a tokenized Hugging Face dataset."""
    from torch.utils.data import Dataset

    class DictSet(Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in inputs.items()}, "label": labels[i]}

    return DictSet()


# ---- one cell -----------------------------------------------------------------------------------

def algorithm(row: str, args):
    import lifelong.federated as fl

    lr, m = args.local_lr, args.per_step
    eta = args.afa_eta
    if row == "FedAvg":
        return fl.FedAvg(local_lr=lr, server_lr=1.0, cohort_size=m)
    if row == "FedBuff":
        return fl.FedBuff(local_lr=lr, server_lr=1.0, buffer_size=m)
    if row == "MIFA":
        return fl.MIFA(local_lr=lr, server_lr=1.0, min_fraction=0.0, cohort_size=m)
    if row.startswith("AFA-CD"):
        return fl.AFACD(local_lr=lr, server_lr=eta, buffer_size=m)
    return fl.AFACS(local_lr=lr, server_lr=args.afa_cs_eta, min_new=m)


def run_cell(task: tuple) -> dict:
    kind, row, alpha, seed, args_dict, out = task
    args = argparse.Namespace(**args_dict)
    import torch

    torch.set_num_threads(1)
    import lifelong.federated as fl
    from lifelong.models import load_minilm
    from peft import LoraConfig, get_peft_model

    cache = torch.load(Path(out) / "cache.pt", weights_only=True)
    labels = cache["y_train"].numpy()
    partition = fl.Dirichlet(alpha, over="workers")
    parts = partition.split(labels, args.workers, seed)
    p = fl.label_correlated(labels, parts, beta=args.beta, by="dominant")
    if row.endswith("uniform"):
        p = np.full_like(p, p.mean())
    enc, _ = load_minilm()
    torch.manual_seed(seed)
    tail = fl.EncoderTail(enc, 5, len(cache["class_names"]))
    del enc
    model = get_peft_model(tail, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["query", "value"]))
    for q in model.base_model.model.head.parameters():
        q.requires_grad_(True)
    server = algorithm(row, args)
    faults = fl.Faults(0.3, kinds=("crash", "nan", "inf")) if row == FAULT_ROW else None
    t0 = time.perf_counter()
    res = fl.simulate(model, _dataset(cache["train"], cache["y_train"]), server, num_workers=args.workers,
                      steps=args.steps, test_data=_dataset(cache["test"], cache["y_test"]), partition=partition,
                      participation=fl.Bernoulli(p), local_steps=fl.UniformSteps(1, args.k_max),
                      speed=fl.Speed(sigma=0.5), max_concurrent=20, batch_size=args.batch_size,
                      eval_every=args.eval_every, eval_groups="labels", seed=seed, faults=faults,
                      progress=False)
    out_row = summarise(res, server, p, parts, labels, time.perf_counter() - t0)
    out_row["crashed"] = res.crashed
    out_row["finite"] = all(bool(torch.isfinite(t).all()) for t in res.final_params.values())
    out_row["upload_bytes"] = fl.adapter_bytes(model)
    return out_row


def summarise(res, server, p, parts, labels, seconds: float) -> dict:
    memory = {}
    if hasattr(server, "memory_version"):
        ages = [server.version - v for v in server.memory_version.values()]
        memory = {"slots_filled": len(ages), "slot_age_mean": float(np.mean(ages)) if ages else None,
                  "slot_age_max": int(max(ages)) if ages else None,
                  "averaged_age_mean": res.slot_age_mean, "averaged_age_max": res.slot_age_max,
                  "kept_fresher_than_slot": res.kept_fresher_than_slot, "server_lr": server.server_step}
    return {"history": res.history, "final_accuracy": res.final_accuracy, "steps": res.steps,
            "staleness": {str(k): v for k, v in res.staleness_histogram.items()},
            "dropped_stale": res.dropped_stale, "rejected": res.rejected, "participation": res.participation,
            "participation_gini": res.participation_gini, "p": [float(x) for x in p],
            "dominant": [int(np.bincount(labels[q]).argmax()) for q in parts], "seconds": seconds,
            "memory": memory}


# ---- tables -------------------------------------------------------------------------------------

def _at(history: list[dict], key: str, value: float) -> float:
    """Accuracy at the last evaluation with ``history[key] <= value``."""
    best = None
    for h in history:
        if h[key] <= value:
            best = h["accuracy"]
    return best if best is not None else float("nan")


def tables(results: dict, args) -> list[str]:
    half = args.steps // 2
    lines = [f"Test accuracy (400 AG News sentences), mean ± std over {args.seeds} seeds, after {args.steps} and "
             f"{half} server steps; uploads and uplink bytes at the end (mean); wall time per run.", "",
             "| Dirichlet α | row | acc @ " + str(half) + " | acc @ " + str(args.steps) +
             " | uploads received | uplink MB | dropped stale | wall s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for alpha in args.alphas:
        for row in ROWS:
            cells = [results.get(("text", row, alpha, s)) for s in range(args.seeds)]
            cells = [c for c in cells if c is not None]
            if not cells:
                continue
            final = [c["final_accuracy"] for c in cells]
            mid = [_at(c["history"], "step", half) for c in cells]
            last = [c["history"][-1] for c in cells]
            lines.append(f"| {alpha} | {row} | {np.mean(mid):.3f} ± {np.std(mid):.3f} | "
                         f"{np.mean(final):.3f} ± {np.std(final):.3f} | "
                         f"{np.mean([h['updates_received'] for h in last]):.0f} | "
                         f"{np.mean([h['uplink_bytes'] for h in last]) / 1e6:.1f} | "
                         f"{np.mean([c['dropped_stale'] for c in cells]):.0f} | "
                         f"{np.mean([c['seconds'] for c in cells]):.0f} |")
    lines += ["", "Per-class test accuracy at the end (mean over seeds). Participation probability by the "
              "worker's dominant class: World 0.1, Sports 0.4, Business 0.7, Sci/Tech 1.0 (uniform row: "
              "every worker at the mean). *gap* = Sci/Tech − World accuracy; *bias* = gap − gap of the "
              "uniform-arrival reference at the same α (0 = no participation bias).", "",
              "| Dirichlet α | row | " + " | ".join(CLASSES) + " | gap | bias | memory slots filled / mean age |",
              "|---|---|" + "---|" * (len(CLASSES) + 3)]
    for alpha in args.alphas:
        ref = _class_acc(results, "AFA-CD uniform", alpha, args.seeds)
        for row in ROWS:
            acc = _class_acc(results, row, alpha, args.seeds)
            if acc is None:
                continue
            gap = acc[3] - acc[0]
            bias = gap - (ref[3] - ref[0]) if ref is not None else float("nan")
            mem = ""
            cells = [results.get(("text", row, alpha, s)) for s in range(args.seeds)]
            mems = [c["memory"] for c in cells if c and c.get("memory")]
            if mems:
                mem = (f"{np.mean([m['slots_filled'] for m in mems]):.0f} / "
                       f"{np.mean([m['slot_age_mean'] for m in mems]):.1f} steps")
            lines.append(f"| {alpha} | {row} | " + " | ".join(f"{a:.3f}" for a in acc) +
                         f" | {gap:+.3f} | {bias:+.3f} | {mem} |")
    return lines


def _class_acc(results, row, alpha, seeds):
    cells = [results.get(("text", row, alpha, s)) for s in range(seeds)]
    cells = [c for c in cells if c is not None]
    if not cells:
        return None
    return [float(np.mean([c["history"][-1]["group_accuracy"][str(k)] for c in cells])) for k in range(4)]


def plot(results: dict, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 * len(args.alphas), figsize=(5 * 2 * len(args.alphas), 3.6), squeeze=False)
    for j, alpha in enumerate(args.alphas):
        for row in ROWS:
            cells = [results.get(("text", row, alpha, s)) for s in range(args.seeds)]
            cells = [c for c in cells if c is not None]
            if not cells:
                continue
            n = min(len(c["history"]) for c in cells)
            acc = np.mean([[h["accuracy"] for h in c["history"][:n]] for c in cells], axis=0)
            steps = [h["step"] for h in cells[0]["history"][:n]]
            mb = np.mean([[h["uplink_bytes"] / 1e6 for h in c["history"][:n]] for c in cells], axis=0)
            style = "--" if row.endswith("uniform") else "-"
            axes[0][2 * j].plot(steps, acc, style, label=row)
            axes[0][2 * j + 1].plot(mb, acc, style, label=row)
        axes[0][2 * j].set_title(f"AG News, MiniLM+LoRA, α={alpha}")
        axes[0][2 * j].set_xlabel("server steps")
        axes[0][2 * j + 1].set_xlabel("uplink MB")
        for ax in axes[0][2 * j:2 * j + 2]:
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/federated_text")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--n-train", type=int, default=250)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--per-step", type=int, default=5)
    parser.add_argument("--k-max", type=int, default=3)
    parser.add_argument("--local-lr", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--fault-seeds", type=int, default=1)
    parser.add_argument("--afa-eta", type=float, default=1.0, help="AFA-CD server step size η")
    parser.add_argument("--afa-cs-eta", type=float, default=None,
                        help="AFA-CS server step size η (default: derived from the federation, 0.123 here)")
    parser.add_argument("--quick", action="store_true", help="10 steps, 1 seed, α = 0.1 (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.alphas, args.eval_every = 10, 1, [0.1], 5
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cfg = settings(args)
    cache = out / "cache.pt"
    meta = out / "cache.json"
    key = {k: cfg[k] for k in ("n_train", "n_test", "max_length")}
    if not cache.exists() or not meta.exists() or json.loads(meta.read_text()) != key:
        t0 = time.perf_counter()
        build_cache(args, cache)
        meta.write_text(json.dumps(key))
        print(f"cached the frozen MiniLM layers for {args.n_train * 4 + args.n_test * 4} sentences in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    base_tag = "_".join(f"{v}" for v in cfg.values())

    def tag_of(row: str) -> str:   # AFA rows also depend on η
        if row.startswith("AFA-CS"):
            return base_tag + f"_cseta{args.afa_cs_eta if args.afa_cs_eta is not None else 'auto'}"
        return base_tag + (f"_eta{args.afa_eta}" if row.startswith("AFA") else "")
    todo, results = [], {}
    for alpha in args.alphas:
        for row in args.rows:
            for seed in range(args.seeds):
                path = out / "cells" / f"text_{row.replace(' ', '-')}_{alpha}_{seed}_{tag_of(row)}.json"
                if path.exists():
                    results[("text", row, alpha, seed)] = json.loads(path.read_text())
                else:
                    todo.append((path, ("text", row, alpha, seed, vars(args), str(out))))
    for seed in range(args.fault_seeds):
        alpha = args.alphas[0]
        path = out / "cells" / f"text_faults_{alpha}_{seed}_{tag_of(FAULT_ROW)}.json"
        if path.exists():
            results[("text", FAULT_ROW, alpha, seed)] = json.loads(path.read_text())
        else:
            todo.append((path, ("text", FAULT_ROW, alpha, seed, vars(args), str(out))))
    todo.sort(key=lambda item: not item[1][1].startswith("AFA"))   # AFA rows first
    print(f"{len(results)} cached cells, {len(todo)} to run on {args.jobs} processes", flush=True)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_cell, task): (path, task) for path, task in todo}
        for fut in futures:
            path, task = futures[fut]
            row = fut.result()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            os.replace(tmp, path)
            results[task[:4]] = row
            print(f"  {task[1]:15s} α={task[2]:<4} seed={task[3]} acc={row['final_accuracy']:.3f} "
                  f"({row['seconds']:.0f} s, {time.perf_counter() - t0:.0f} s elapsed)", flush=True)
    lines = tables(results, args)
    faulty = [(k, v) for k, v in results.items() if k[1] == FAULT_ROW]
    if faulty:
        lines += ["", f"{FAULT_ROW} (α = {args.alphas[0]}; 30% of workers faulty, each of their jobs crashes or "
                  "uploads NaN / inf adapter tensors):", "",
                  "| seed | acc @ end | uploads received | rejected (non-finite) | crashed jobs | global adapter finite |",
                  "|---|---|---|---|---|---|"]
        for (_, _, _, seed), v in sorted(faulty):
            lines.append(f"| {seed} | {v['final_accuracy']:.3f} | {v['history'][-1]['updates_received']} | "
                         f"{sum(v['rejected'].values())} | {v['crashed']} | {v['finite']} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    plot(results, args, out / "accuracy.png")
    print(text)


if __name__ == "__main__":
    main()
