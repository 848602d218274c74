"""CorDA-KPM, then KORE, on the shipped MiniLM, calibrated once on the same "old knowledge".

Both methods read the input covariance of the targeted layers on data whose behaviour should be
kept (here: docstrings of the Python standard library). It is collected once, saved, and reused.

    python examples/corda_then_kore.py [--r 8] [--out outputs/corda_kore] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import re
import string
from pathlib import Path

import torch

import lifelong as ll
from lifelong.adapters.calibration import calibrate
from lifelong.adapters.kore import null_space_report

TARGETS = ["query", "value"]


def old_knowledge(limit: int) -> list[str]:
    docs = [inspect.getdoc(obj) for module in (json, math, os.path, re, string)
            for name, obj in sorted(vars(module).items()) if callable(obj) and not name.startswith("_")]
    return [d.split("\n\n")[0][:200] for d in docs if d][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("outputs/corda_kore"))
    parser.add_argument("--smoke", action="store_true", help="few texts, for tests")
    args = parser.parse_args()
    model, tokenizer = ll.models.load_minilm()
    texts = old_knowledge(16 if args.smoke else 128)
    batches = [dict(tokenizer(texts[i : i + 16], padding=True, truncation=True, max_length=64, return_tensors="pt"))
               for i in range(0, len(texts), 16)]
    stats = calibrate(model, batches, TARGETS, normalize="max")  # the default of both methods (PEFT parity)
    stats.save(args.out / "old_knowledge.safetensors")  # reusable by any later run
    probe = batches[0]
    with torch.no_grad():
        reference = model(**probe).last_hidden_state
    print(f"calibrated {len(stats.sums)} layers on {len(texts)} docstrings -> {args.out / 'old_knowledge.safetensors'}")
    for method, options in (("corda", {"mode": "kpm"}), ("kore", {})):
        adapted = ll.wrap(copy.deepcopy(model), method, r=args.r, target_modules=TARGETS,
                          calibration=args.out / "old_knowledge.safetensors", **options)
        with torch.no_grad():
            gap = (adapted(**probe).last_hidden_state - reference).abs().max().item()
        trainable, total = adapted.get_nb_trainable_parameters()
        print(f"{method:>5}: {trainable:,d} trainable of {total:,d}; max |output - base| at init = {gap:.2e}")
        if method == "kore":
            worst = max(null_space_report(adapted), key=lambda row: row["null_mass"])
            print(f"       largest eigenvalue mass kept in a null space: {worst['null_mass']:.2e} ({worst['layer']})")


if __name__ == "__main__":
    main()
