"""Continual learning on scikit-learn digits: Naive, EWC, Replay (Avalanche) vs MIGU, CLASSP,
power-law rehearsal, KCL and GKCL.

Streams: split-digits, 5 tasks of 2 classes, class-incremental (single head, no task id) and
task-incremental (task id given, logits restricted to the task's classes); permuted-digits,
10 tasks (domain-incremental, one shared head; task labels attached so KCL/GKCL can pick their
per-task head). Model: MLP 64-128-128-10 (KCL/GKCL: the same MLP without the last layer as the
feature extractor, trained 1 epoch per task with batch 10 as in the KCL reference). Per seed and method: average accuracy (ACC), Chaudhry's average forgetting,
BWT, wall time, mean training-step time and the memory held besides the model.

    python benchmarks/continual_digits.py [--seeds 0 1 2] [--epochs 5] [--out results/]

Every run is cached as JSON under ``<out>/continual_digits_runs/`` (an interrupted benchmark
resumes where it stopped); the table is printed and written to ``<out>/continual_digits.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lifelong.continual as lc

LR = 0.05
BATCH = 32
# (label, method, engine, method_options, lr). Hyperparameters: library defaults except CLASSP's
# threshold (its default 0.5 is absolute on g² and freezes every weight of a mean-reduced CE loss)
# and EWC's λ (100; 1000 and 10000 drove the accuracy to chance on a seed-0 trial).
METHODS = [
    ("Naive (native)", "naive", "native", None, LR),
    ("Naive (Avalanche)", "naive", "avalanche", None, LR),
    ("EWC λ=100 (Avalanche)", "ewc", "avalanche", {"ewc_lambda": 100.0}, LR),
    ("Replay 200 (Avalanche)", "replay", "avalanche", {"mem_size": 200}, LR),
    ("MIGU T=0.7", "migu", "native", {"mask_ratio": 0.7}, LR),
    ("CLASSP p=1 τ=0", "classp", "native", {"threshold": 0.0, "power": 1.0}, LR),
    ("PowerLaw α=1 ρ=0.25", "powerlaw", "native", {"alpha": 1.0, "ratio": 0.25}, LR),
    ("Exponential β=1 ρ=0.25", "powerlaw", "native", {"kind": "exponential", "ratio": 0.25}, LR),
    ("Uniform ρ=0.25", "powerlaw", "native", {"kind": "uniform", "ratio": 0.25}, LR),
    ("KCL (coreset 20/class)", "kcl", "native", {"samples_per_class": 20}, 0.1),
    ("GKCL (generator, 20/class)", "gkcl", "native", {"samples_per_class": 20}, 0.1),
]
KERNEL = ("kcl", "gkcl")


def streams(seed: int) -> dict:
    return {
        "split-5 class-IL": lc.split_digits(5, seed=seed),
        "split-5 task-IL": lc.split_digits(5, task_incremental=True, seed=seed),
        "permuted-10": lc.permuted_digits(10, seed=seed, task_labels=True),
    }


def model(seed: int, head: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*(layers + [nn.Linear(128, 10)] if head else layers[:-1]))


def memory_floats(res: lc.StreamResult, method: str, options: dict | None, n_params: int, n_tasks: int) -> int:
    """Numbers held besides the model: stored inputs × 64, generator parameters, EWC's F and θ*."""
    mem = res.memory
    if method == "ewc":  # "separate" mode keeps importances and parameters of every past experience
        return 2 * n_params * (n_tasks - 1)
    if method == "classp":
        return n_params  # the accumulator
    if "generator_parameters" in mem:
        return int(mem["generator_parameters"])
    return 64 * int(mem.get("replay_samples", 0) + mem.get("coreset_samples", 0))


def run_one(label, method, engine, options, lr, stream_name, stream, seed, epochs, cache: Path) -> dict:
    key = f"{stream_name}__{label}__{seed}".replace(" ", "_").replace("/", "-")
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    net = model(seed, head=method not in KERNEL)
    # KCL/GKCL: the reference protocol, 1 epoch per task with batch 10 (the support set goes through
    # the backbone at every step, so more epochs cost 5x on 2 CPU cores).
    res = lc.run_stream(net, stream, method, engine=engine, method_options=options,
                        epochs=epochs if method not in KERNEL else 1, lr=lr,
                        batch_size=BATCH if method not in KERNEL else 10, seed=seed, progress=False)
    n_params = sum(p.numel() for p in net.parameters())
    row = {"acc": res.acc, "forgetting": res.forgetting, "bwt": res.bwt, "wall_s": res.wall_time_s,
           "step_ms": 1000 * res.step_time_s,
           "memory": memory_floats(res, method, options, n_params, len(res.accuracy_matrix)),
           "matrix": res.accuracy_matrix}
    text = json.dumps(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return row


def step_overhead(build, loss_of, rounds: int = 15, steps: int = 200, warmup: int = 20) -> dict[str, float]:
    """Per-step time of Naive (SGD), MIGU (T=0.7, SGD) and CLASSP on ``build()``, in milliseconds:
    the three set-ups are built and warmed up once, then timed in interleaved blocks of ``steps``
    steps in the same process. Reported: the median time over rounds, as ``<kind>/naive`` the
    median of the per-round ratios (the machine's speed drifts), and as ``<kind>/calls`` the ATen
    calls of one step.

    Learning rate 0: every set-up then runs its forward and backward on the same weights, so the
    difference is the method's own work. With a real step the weights drift apart and the cost of
    the forward drifts with them (MiniLM's forward ran 10% slower after a few CLASSP steps at
    lr 0.05, which is not CLASSP's overhead)."""
    import time

    def setup(kind: str):
        torch.manual_seed(0)
        net = build()
        opt = lc.CLASSP(net.parameters(), lr=0.0, threshold=0.0) if kind == "classp" else \
            torch.optim.SGD(net.parameters(), lr=0.0)
        migu = lc.MIGU(mask_ratio=0.7, start_task=0).attach(net) if kind == "migu" else None

        def block(n: int) -> float:
            # CPU time of this thread: time the hypervisor gives to other guests is not counted
            t0 = time.thread_time()
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                loss_of(net).backward()
                if migu is not None:
                    migu.mask_gradients()
                opt.step()
                if migu is not None:
                    migu.after_step()
            return 1000 * (time.thread_time() - t0) / n

        block(warmup)  # lazily created optimizer state, allocator, caches
        return block

    blocks = {kind: setup(kind) for kind in ("naive", "migu", "classp")}
    calls = {kind: aten_calls(lambda: block(1)) for kind, block in blocks.items()}
    times: dict[str, list[float]] = {kind: [] for kind in blocks}
    for _ in range(rounds):
        for kind, block in blocks.items():
            times[kind].append(block(steps))
    out = {k: float(np.median(v)) for k, v in times.items()}
    out.update({f"{kind}/calls": float(n) for kind, n in calls.items()})
    for kind in ("migu", "classp"):
        out[f"{kind}/naive"] = float(np.median(np.array(times[kind]) / np.array(times["naive"])))
    return out


def aten_calls(fn) -> int:
    """How many ATen operator calls ``fn()`` makes, backward included: on small models each call,
    not the arithmetic, is what a step costs (about 10 µs here), so this count explains the timings
    on any machine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def overhead_rows() -> list[str]:
    """The overhead table: the benchmark MLP, a wide MLP, and the real MiniLM (full fine-tuning)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for width, batch in ((128, BATCH), (1024, 256)):
        x, y = torch.rand(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)
        o = step_overhead(lambda: nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                                nn.Linear(width, 10)),
                          lambda net: nn.functional.cross_entropy(net(x), y), rounds=15 if width == 128 else 7)
        rows.append((f"MLP 64-{width}-{width}-10, batch {batch}", o))
    from lifelong.models import load_minilm

    ids = torch.randint(1000, 20000, (8, 128), generator=g)
    o = step_overhead(lambda: load_minilm()[0].train(),
                      lambda net: net(input_ids=ids).last_hidden_state[:, 0].pow(2).mean(), rounds=7, steps=3, warmup=1)
    rows.append(("MiniLM (22.7M params, all 73 linears), 8 × 128 tokens", o))
    return [f"| {name} | {o['naive']:.3f} ({o['naive/calls']:.0f}) | {o['migu']:.3f} ({o['migu/naive']:.2f}×, "
            f"{o['migu/calls']:.0f}) | {o['classp']:.3f} ({o['classp/naive']:.2f}×, {o['classp/calls']:.0f}) |"
            for name, o in rows]


def fmt(values, pct=True) -> str:
    v = np.asarray(values, dtype=float)
    scale = 100 if pct else 1
    return f"{scale * v.mean():.1f} ± {scale * v.std():.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--streams", nargs="+", default=None, help="subset of stream names")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny models: extra threads only add contention
    cache = args.out / "continual_digits_runs"
    cache.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    results: dict = {}
    jobs = [(s, m) for s in args.seeds for m in METHODS]
    bar = tqdm(total=len(jobs) * 3, desc="continual_digits", unit="run")
    for seed in args.seeds:
        for stream_name, stream in streams(seed).items():
            if args.streams and stream_name not in args.streams:
                bar.update(len(METHODS))
                continue
            for label, method, engine, options, lr in METHODS:
                bar.set_postfix_str(f"{stream_name} | {label} | seed {seed}")
                if method in KERNEL and stream_name.endswith("class-IL"):
                    bar.update(1)  # KCL/GKCL need the task id at test time: not applicable
                    continue
                row = run_one(label, method, engine, options, lr, stream_name, stream, seed, args.epochs, cache)
                results.setdefault(stream_name, {}).setdefault(label, []).append(row)
                bar.update(1)
    bar.close()

    lines = [f"# Continual learning on sklearn digits ({len(args.seeds)} seeds, {args.epochs} epochs/task, CPU, 1 thread)",
             "", "ACC, forgetting (Chaudhry, max-based) and BWT in %, mean ± std over seeds. Step = mean "
             "training step (forward+backward+method hooks+optimizer). Memory = floats held besides the model "
             "(stored inputs × 64, generator parameters, EWC importances+anchors, CLASSP accumulator).", ""]
    for stream_name, rows in results.items():
        naive_step = np.mean([r["step_ms"] for r in rows.get("Naive (native)", [{"step_ms": math.nan}])])
        lines += [f"## {stream_name}", "",
                  "| method | ACC | forgetting | BWT | wall s | step ms | step / native naive | memory (floats) |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, runs in rows.items():
            step = np.mean([r["step_ms"] for r in runs])
            lines.append(f"| {label} | {fmt([r['acc'] for r in runs])} | {fmt([r['forgetting'] for r in runs])} | "
                         f"{fmt([r['bwt'] for r in runs])} | {np.mean([r['wall_s'] for r in runs]):.1f} | "
                         f"{step:.2f} | {step / naive_step:.2f}× | {int(np.mean([r['memory'] for r in runs])):,} |")
        lines.append("")
    lines += ["## Per-step overhead (same process, warmed up, interleaved blocks; thread CPU time; × = median per-round ratio; MLPs 15 / 7 rounds of 200 steps, MiniLM 7 rounds of 3 steps)", "",
              "| model, batch | Naive ms (ATen calls/step) | MIGU ms (×, calls) | CLASSP ms (×, calls) |", "|---|---|---|---|"]
    lines += overhead_rows()
    lines.append("")
    text = "\n".join(lines)
    print(text)
    (args.out / "continual_digits.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
