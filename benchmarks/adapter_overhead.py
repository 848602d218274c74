"""Training-step cost of each adapter on the real MiniLM (CPU), against PEFT, in one run.

One step = forward + backward + optimizer step on a batch of 16 × 128 tokens. Times come from one
process holding every configuration, stepping them in interleaved rounds (so machine noise hits
all of them alike); the table shows the median step time, the ratio to PEFT LoRA r=16 measured in
the same run, trainable parameters, and the peak RSS of a separate process running that
configuration alone.

    python benchmarks/adapter_overhead.py [--rounds 8] [--out results/]

Targets: bone ≤ PEFT MiSS (ratio ≤ 1.0) and SSF ≤ 1.1× the frozen-base
forward+backward (the base with no trainable weight: backward computes input gradients only).
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

from lifelong.files import atomic_write_text

CONFIGS = {
    "full fine-tune": "full",
    "frozen base (fwd+bwd)": "frozen",
    "PEFT LoRA r=16": "peft-lora",
    "PEFT MiSS r=64": "peft-miss",
    "lifelong bone r=64": "bone",
    "lifelong ssf": "ssf",
    "lifelong lamda r=16": "lamda",
}
TARGETS = ["query", "value"]


def build(kind: str):
    import torch

    import lifelong as ll

    model, _ = ll.models.load_minilm()
    if kind == "full":
        return model, list(model.parameters())
    if kind == "frozen":
        model.requires_grad_(False)
        # Backward still runs through every layer: the embeddings' output requires grad.
        model.embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
        return model, []
    if kind.startswith("peft"):
        from peft import LoraConfig, MissConfig, get_peft_model

        config = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS) if kind == "peft-lora" else \
            MissConfig(r=64, target_modules=TARGETS)
        peft_model = get_peft_model(model, config)
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    options = {"bone": {"r": 64, "target_modules": TARGETS}, "lamda": {"r": 16, "target_modules": TARGETS},
               "ssf": {}}[kind]
    adapted = ll.wrap(model, kind, **options)
    torch.manual_seed(0)
    return adapted, list(adapted.trainable_parameters())


def make_batch():
    import torch

    return {"input_ids": torch.randint(1000, 20000, (16, 128)), "attention_mask": torch.ones(16, 128, dtype=torch.long)}


class Runner:
    """One configuration: its model, optimizer and a ``step()`` returning the seconds it took."""

    def __init__(self, kind: str):
        import torch

        torch.manual_seed(0)
        self.model, params = build(kind)
        self.model.train()
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step(self, batch: dict) -> float:
        start = time.perf_counter()
        self.model(**batch).last_hidden_state.pow(2).mean().backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def high_water_mb() -> float:
    """This process's peak RSS. ``/proc`` resets it at exec, unlike ``getrusage``'s ru_maxrss,
    which a child inherits from its parent on Linux."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(kind: str) -> float:
    """Peak RSS of a fresh process that builds ``kind`` and takes two steps."""
    out = subprocess.run([sys.executable, __file__, "--one", kind], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="adapter training-step overhead on MiniLM")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        runner = Runner(args.one)
        for _ in range(2):
            runner.step(make_batch())
        print(high_water_mb())
        return
    import torch

    peaks = {name: peak_rss_mb(kind) for name, kind in CONFIGS.items()}  # before this process grows
    torch.manual_seed(0)
    batch = make_batch()
    runners = {name: Runner(kind) for name, kind in CONFIGS.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds (+1 warm-up)")
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds + 1):
        order = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            seconds = runners[name].step(batch)
            if round_:  # round 0 warms up allocators and autograd
                times[name].append(seconds)
        print(f"  round {round_}/{args.rounds} done", flush=True)
    rows = [{"config": name, "median_s": statistics.median(times[name]), "trainable": runners[name].trainable,
             "peak_rss_mb": peaks[name]} for name in CONFIGS]
    lora = next(r["median_s"] for r in rows if r["config"] == "PEFT LoRA r=16")
    by_name = {r["config"]: r for r in rows}
    lines = ["| config | median step (s) | vs PEFT LoRA | trainable params | peak RSS alone (MB) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['median_s']:.3f} | {r['median_s'] / lora:.2f}× | {r['trainable']:,} | {r['peak_rss_mb']:.0f} |")
    bone_vs_miss = by_name["lifelong bone r=64"]["median_s"] / by_name["PEFT MiSS r=64"]["median_s"]
    ssf_vs_frozen = by_name["lifelong ssf"]["median_s"] / by_name["frozen base (fwd+bwd)"]["median_s"]
    lines += ["", f"bone / PEFT MiSS = {bone_vs_miss:.2f}× (target ≤ 1.00)",
              f"ssf / frozen-base fwd+bwd = {ssf_vs_frozen:.2f}× (target ≤ 1.10)"]
    table = "\n".join(lines)
    print("\n" + table)
    atomic_write_text(args.out / "adapter_overhead.md", "# Adapter training-step overhead (MiniLM, 16×128, CPU)\n\n" + table + "\n")
    atomic_write_text(args.out / "adapter_overhead.json", json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
