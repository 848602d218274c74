"""Training-step cost of each adapter on the real MiniLM (CPU), against PEFT, in one run.

One step = forward + backward + optimizer step on a batch of 16 × 128 tokens. Each
configuration runs in its own subprocess (so peak RSS is its own), in rounds that alternate the
order; the table shows the median step time over all rounds, the ratio to PEFT LoRA r=16
measured in the same run, trainable parameters and peak RSS.

    python benchmarks/adapter_overhead.py [--steps 6] [--rounds 2] [--out results/]

Targets (issue #2): bone ≤ PEFT MiSS (ratio ≤ 1.0) and SSF ≤ 1.1× the frozen-base
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


def measure(kind: str, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, params = build(kind)
    model.train()
    batch = {"input_ids": torch.randint(1000, 20000, (16, 128)), "attention_mask": torch.ones(16, 128, dtype=torch.long)}
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = model(**batch).last_hidden_state.pow(2).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and autograd
            times.append(time.perf_counter() - start)
    return {"kind": kind, "times": times, "trainable": sum(p.numel() for p in params),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description="adapter training-step overhead on MiniLM")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return
    import torch

    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds × {args.steps} steps")
    for round_ in range(args.rounds):
        names = list(CONFIGS) if round_ % 2 == 0 else list(reversed(CONFIGS))
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--one", CONFIGS[name], "--steps", str(args.steps)],
                                 capture_output=True, text=True, env=env, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1}: {name} done", flush=True)
    rows = []
    for name, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        rows.append({"config": name, "median_s": statistics.median(times), "trainable": runs[0]["trainable"],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)})
    lora = next(r["median_s"] for r in rows if r["config"] == "PEFT LoRA r=16")
    by_name = {r["config"]: r for r in rows}
    lines = ["| config | median step (s) | vs PEFT LoRA | trainable params | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['median_s']:.3f} | {r['median_s'] / lora:.2f}× | {r['trainable']:,} | {r['peak_rss_mb']:.0f} |")
    bone_vs_miss = by_name["lifelong bone r=64"]["median_s"] / by_name["PEFT MiSS r=64"]["median_s"]
    ssf_vs_frozen = by_name["lifelong ssf"]["median_s"] / by_name["frozen base (fwd+bwd)"]["median_s"]
    lines += ["", f"bone / PEFT MiSS = {bone_vs_miss:.2f}× (target ≤ 1.00)",
              f"ssf / frozen-base fwd+bwd = {ssf_vs_frozen:.2f}× (target ≤ 1.10)"]
    table = "\n".join(lines)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_overhead.md").write_text("# Adapter training-step overhead (MiniLM, 16×128, CPU)\n\n" + table + "\n")
    (args.out / "adapter_overhead.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
