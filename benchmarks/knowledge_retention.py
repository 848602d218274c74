"""Knowledge retention on MiniLM: LoRA vs CorDA-KPM vs KORE at equal trainable parameters.

New task (real, offline): classify the one-line ``Summary`` of every installed Python package
(``importlib.metadata``) by whether its Trove classifiers include ``Topic :: Scientific/
Engineering``. A linear head on the mean-pooled embedding is trained together with the adapter
(the same head init for every method). Old knowledge: docstrings of the Python standard library;
one part calibrates CorDA-KPM and KORE (the same saved statistics, collected once), a disjoint
held-out part measures drift = mean cosine distance between the base model's and the adapted
model's sentence embeddings (the sentence-transformers mean pooling of all-MiniLM-L6-v2).

Equal budgets on query/value (384×384): LoRA r (PEFT), CorDA-KPM r, KORE 2r (only B trains:
out·2r = r·(in+out)).

    python benchmarks/knowledge_retention.py [--r 8] [--steps 60] [--out results/]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import os
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from calibration_speed import stdlib_docstrings  # noqa: E402

TARGETS = ["query", "value"]


def package_task(seed: int) -> tuple[list[str], list[int], list[str], list[int]]:
    """Package summaries labelled scientific (1) or not (0), split 70/30 by a seeded shuffle."""
    rows = {}
    for dist in md.distributions():
        name, summary = dist.metadata.get("Name"), dist.metadata.get("Summary")
        if name and summary and len(summary) > 10:
            topics = dist.metadata.get_all("Classifier") or []
            rows[name.lower()] = (summary, int(any("Topic :: Scientific/Engineering" in c for c in topics)))
    items = [rows[k] for k in sorted(rows)]
    random.Random(seed).shuffle(items)
    cut = int(0.7 * len(items))
    train, test = items[:cut], items[cut:]
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]


def embed(model: nn.Module, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    outs = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        outs.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(outs)


def build(method: str, base: nn.Module, r: int, stats) -> tuple[nn.Module, list[nn.Parameter]]:
    model = copy.deepcopy(base)
    if method == "LoRA (PEFT)":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
        return model, [p for p in model.parameters() if p.requires_grad]
    import lifelong as ll

    if method == "CorDA-KPM":
        adapted = ll.wrap(model, "corda", r=r, lora_alpha=r, mode="kpm", target_modules=TARGETS, calibration=stats)
    else:
        adapted = ll.wrap(model, "kore", r=2 * r, target_modules=TARGETS, calibration=stats, null_tol=1.0)
    return adapted, list(adapted.trainable_parameters())


def run(method: str, base, tokenizer, task, old_eval, base_old, stats, args) -> dict:
    torch.manual_seed(args.seed)
    model, params = build(method, base, args.r, stats)
    head = nn.Linear(base.config.hidden_size, 2)
    torch.manual_seed(args.seed)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW([*params, *head.parameters()], lr=args.lr, weight_decay=0.0)
    x_train, y_train, x_test, y_test = task
    g = random.Random(args.seed)
    model.train()
    for _ in range(args.steps):
        idx = g.sample(range(len(x_train)), args.batch)
        logits = head(embed(model, tokenizer, [x_train[i] for i in idx]))
        loss = F.cross_entropy(logits, torch.tensor([y_train[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = head(embed(model, tokenizer, x_test))
        labels = torch.tensor(y_test)
        test_loss = float(F.cross_entropy(logits, labels))
        acc = float((logits.argmax(1) == labels).float().mean())
        drift = 1 - F.cosine_similarity(embed(model, tokenizer, old_eval), base_old, dim=-1)
    return {"method": method, "trainable": sum(p.numel() for p in params), "test_loss": test_loss, "acc": acc,
            "drift_mean": float(drift.mean()), "drift_max": float(drift.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description="knowledge retention: LoRA vs CorDA-KPM vs KORE on MiniLM")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--old-calib", type=int, default=96, help="docstrings used for calibration")
    parser.add_argument("--old-eval", type=int, default=96, help="held-out docstrings for drift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lifelong.adapters.calibration import CovarianceStats, calibrate
    from lifelong.models import load_minilm

    base, tokenizer = load_minilm()
    docs = stdlib_docstrings()
    random.Random(args.seed).shuffle(docs)
    old_calib, old_eval = docs[:args.old_calib], docs[args.old_calib:args.old_calib + args.old_eval]
    task = package_task(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    stats_path = args.out / "old_knowledge_cov.safetensors"
    targets = {n: m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    batches = [dict(tokenizer(old_calib[i:i + 8], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(old_calib), 8)]
    calibrate(base, batches, targets, progress=False).save(stats_path)  # once, shared by CorDA-KPM and KORE
    stats = CovarianceStats.load(stats_path)
    with torch.no_grad():
        base_old = embed(base, tokenizer, old_eval)
    rows = [run(m, base, tokenizer, task, old_eval, base_old, stats, args) for m in ("LoRA (PEFT)", "CorDA-KPM", "KORE")]
    lines = ["| method | trainable | new-task test loss | new-task acc | old-text drift mean | old-text drift max |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['trainable']:,} | {r['test_loss']:.3f} | {r['acc']:.3f} | {r['drift_mean']:.2e} | "
              f"{r['drift_max']:.2e} |" for r in rows]
    positives = sum(task[3])
    header = (f"# Knowledge retention, MiniLM, query/value, r={args.r} (KORE {2 * args.r}), {args.steps} steps × "
              f"{args.batch}, lr {args.lr}, seed {args.seed}\n\nNew task: {len(task[0])} train / {len(task[2])} test "
              f"package summaries ({positives} scientific in test, majority baseline "
              f"{max(positives, len(task[3]) - positives) / len(task[3]):.3f}). Old knowledge: {len(old_calib)} "
              f"calibration / {len(old_eval)} held-out stdlib docstrings.\n\n")
    (args.out / "knowledge_retention.md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
