"""Calibration + CorDA init on the real MiniLM: PEFT's ``preprocess_corda`` + ``get_peft_model``
against ``lifelong.wrap(model, "corda", calibration=...)``, same data, same run.

Data: 128 sequences × 128 tokens cut from the docstrings of the Python standard library (real,
offline text). Targets: every linear layer of the encoder (36; the pooler is left out because
PEFT's hook squeezes its (1, 384) input to a vector and fails). PEFT's calibration sees one
sequence per call (its hook only supports batch size 1); ours runs batches of 16 padded-free
sequences (each sequence still weighted as one call) and, for bit-exact parity, batches of 1.
Each configuration runs in its own subprocess, so wall time and peak RSS are its own.

    python benchmarks/calibration_speed.py [--sequences 128] [--tokens 128] [--out results/]

Target (issue #3): ours ≥ 2× faster than PEFT with equal results (products s·B·A and residual
weights compared layer by layer, relative Frobenius error).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGETS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
STDLIB = ["json", "os", "re", "collections", "functools", "itertools", "pathlib", "subprocess", "argparse",
          "logging", "typing", "dataclasses", "inspect", "string", "textwrap", "shutil", "tempfile", "random",
          "statistics", "decimal", "fractions", "datetime", "calendar", "heapq", "bisect", "email", "http",
          "urllib", "csv", "sqlite3", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "socket",
          "threading", "asyncio", "unittest", "doctest", "pdb", "pickle", "copy", "pprint", "enum", "abc"]


def stdlib_docstrings(modules: list[str] = STDLIB) -> list[str]:
    """Docstrings of the modules above and of their public functions and classes, in a fixed order."""
    import importlib

    texts = []
    for name in modules:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_"))]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc and len(doc) > 80 and doc not in texts:
                texts.append(doc)
    return texts


def token_sequences(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens ([CLS] … [SEP]) from the concatenated docstrings."""
    ids = tokenizer("\n\n".join(stdlib_docstrings()), add_special_tokens=False)["input_ids"]
    body = length - 2
    if len(ids) < n * body:
        raise RuntimeError(f"only {len(ids)} tokens of docstrings, need {n * body}")
    return [[tokenizer.cls_token_id, *ids[i * body:(i + 1) * body], tokenizer.sep_token_id] for i in range(n)]


def run_one(kind: str, n: int, length: int, out: Path) -> None:
    import torch

    torch.manual_seed(0)
    from lifelong.models import load_minilm

    model, tokenizer = load_minilm()
    seqs = torch.tensor(token_sequences(tokenizer, n, length))
    mask = torch.ones_like(seqs)
    start = time.perf_counter()
    if kind == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="corda",
                            corda_config=CordaConfig(corda_method="kpm"))

        def run_model() -> None:
            for i in range(n):
                model(input_ids=seqs[i:i + 1], attention_mask=mask[i:i + 1])

        preprocess_corda(model, config, run_model=run_model)
        peft_model = get_peft_model(model, config)
        elapsed = time.perf_counter() - start
        layers = {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
        result = {name: (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight,
                         m.base_layer.weight) for name, m in layers.items()}
    else:
        import lifelong as ll

        batch = int(kind.split("-")[1])
        batches = [{"input_ids": seqs[i:i + batch], "attention_mask": mask[i:i + batch]} for i in range(0, n, batch)]
        adapted = ll.wrap(model, "corda", r=8, lora_alpha=16, mode="kpm", target_modules=TARGETS,
                          calibration=batches, progress=False)
        elapsed = time.perf_counter() - start
        result = {layer.adapters["default"].layer_name: (layer.adapters["default"].delta_weight(layer.base_layer),
                                                         layer.base_layer.weight) for layer in adapted.adapted_layers()}
    from safetensors.torch import save_file

    tensors = {f"{k}|delta": d.detach().float().contiguous() for k, (d, _) in result.items()}
    tensors.update({f"{k}|residual": w.detach().float().contiguous() for k, (_, w) in result.items()})
    save_file(tensors, str(out / f"{kind}.safetensors"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": elapsed, "rss_mb": rss, "layers": len(result)}))


def compare(a: Path, b: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    worst = {"delta": 0.0, "residual": 0.0}
    for key, ref in y.items():
        part = key.split("|")[1]
        worst[part] = max(worst[part], float((x[key] - ref).norm() / ref.norm()))
    return worst["delta"], worst["residual"]


def main() -> None:
    parser = argparse.ArgumentParser(description="calibration + CorDA init speed on MiniLM vs PEFT")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_one(args.one, args.sequences, args.tokens, args.out)
        return
    rows = {}
    for kind in ("peft", "ours-16", "ours-1"):
        cmd = [sys.executable, __file__, "--one", kind, "--sequences", str(args.sequences), "--tokens",
               str(args.tokens), "--out", str(args.out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
        rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    names = {"peft": "PEFT preprocess_corda + get_peft_model (batch 1)", "ours-16": "lifelong corda (batches of 16)",
             "ours-1": "lifelong corda (batch 1)"}
    lines = ["| method | wall s | speed-up vs PEFT | peak RSS MB | max rel. err s·B·A | max rel. err W_res |",
             "|---|---|---|---|---|---|"]
    for kind, row in rows.items():
        err = ("—", "—") if kind == "peft" else tuple(
            f"{e:.1e}" for e in compare(args.out / f"{kind}.safetensors", args.out / "peft.safetensors"))
        lines.append(f"| {names[kind]} | {row['seconds']:.1f} | {rows['peft']['seconds'] / row['seconds']:.2f}× | "
                     f"{row['rss_mb']:.0f} | {err[0]} | {err[1]} |")
    table = "\n".join(lines)
    header = (f"# Calibration + CorDA-KPM init, MiniLM, {args.sequences} × {args.tokens} tokens, "
              f"{rows['peft']['layers']} linear layers, r=8 (CPU, {os.cpu_count()} cores)\n\n")
    (args.out / "calibration_speed.md").write_text(header + table + "\n")
    print(header + table)
    for kind in rows:
        (args.out / f"{kind}.safetensors").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
