"""Benchmark and GPU check of lifelong.kernels.

    python benchmarks/kernel_speed.py [--out results/kernels.md] [--write-table] [--quick]

On a CUDA machine it first checks every op's Triton path against a float64 reference (fp32, fp16,
bf16), then times, with ``triton.testing.do_bench`` (median of ``rep`` ms, L2 flushed), for
M ∈ {16, 512, 8192}, in = out = 4096, r ∈ {16, 64}, bf16, forward and forward+backward (frozen W:
dX, dA, dB) of: the base ``F.linear``, PEFT's LoRA ``Linear``, unfused torch, our ``composite`` and
our ``triton``. Per row: median ms, TFLOP/s on useful FLOPs (forward ``2MNK + 2Mr(K+N)``, backward
``2MNK + 4Mr(K+N)``), GB/s on minimum bytes, overhead over the base GEMM and speed ratio to PEFT,
all measured in the same run on the named card. Covariance: tokens/s of ``cov_accumulate_``
(triton, composite) vs ``C.addmm_(Xᵀ, X)`` on an fp32 copy, d ∈ {1024, 4096}, 2048 tokens/update.
``--write-table`` stores the buckets where Triton beat composite by ≥ 3 % as the dispatch table
``kernels/tuned/<gpu>.json`` that ``backend="auto"`` reads. Targets: forward overhead
≤ 8 % at M = 8192, ≤ 10 % at M = 16; forward+backward ≥ 1.25× faster than PEFT.

Without CUDA, or under ``TRITON_INTERPRET=1`` (the interpreter cannot time anything), it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

K_IN = N_OUT = 4096
MS = (16, 512, 8192)
RANKS = (16, 64)
COV_D = (1024, 4096)
COV_TOKENS = 2048
DEVICE = "cuda"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0])


def peft_layer(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> nn.Module:
    """PEFT's LoRA ``Linear`` around a frozen nn.Linear holding ``weight``, with our A and B."""
    from peft import LoraConfig, get_peft_model

    r = a.shape[0]
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                        dtype=weight.dtype))
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


def lora_variants(m: int, r: int, dtype: torch.dtype) -> tuple[dict[str, Callable], tuple]:
    import lifelong.kernels as lk

    dev = DEVICE
    x = torch.randn(m, K_IN, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(N_OUT, K_IN, device=dev, dtype=dtype) * K_IN ** -0.5
    a = (torch.randn(r, K_IN, device=dev, dtype=dtype) * K_IN ** -0.5).requires_grad_(True)
    b = torch.randn(N_OUT, r, device=dev, dtype=dtype).requires_grad_(True)  # random B: zeros hide bugs
    s = 2.0
    layer = peft_layer(w, a.detach(), b.detach(), alpha=s * r)
    fns = {
        "base": lambda: F.linear(x, w),
        "peft": lambda: layer(x),
        "unfused": lambda: F.linear(x, w) + (x @ a.T) @ b.T * s,
        "composite": lambda: lk.lora_linear(x, w, None, a, b, s, backend="composite"),
        "triton": lambda: lk.lora_linear(x, w, None, a, b, s, backend="triton"),
    }
    return fns, (x, a, b, layer)


def time_row(name: str, fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        fwd = bench(fn)

    def step() -> None:
        y = fn()
        torch.autograd.grad(y, [i for i in inputs if i.requires_grad], grad)

    return fwd, bench(step)


def lora_table(quick: bool) -> tuple[list[dict], dict[str, str]]:
    from lifelong.kernels.dispatch import bucket_key

    rows, table = [], {}
    dtype = torch.bfloat16
    for r in RANKS:
        for m in (MS[:2] if quick else MS):
            fns, (x, a, b, layer) = lora_variants(m, r, dtype)
            peft_params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            grad = torch.randn(m, N_OUT, device=DEVICE, dtype=dtype)
            times = {}
            for name, fn in fns.items():
                inputs = [x] if name == "base" else (peft_params if name == "peft" else [x, a, b])
                times[name] = time_row(name, fn, inputs, grad)
            flops_f = 2 * m * N_OUT * K_IN + 2 * m * r * (K_IN + N_OUT)
            flops_b = 2 * m * N_OUT * K_IN + 4 * m * r * (K_IN + N_OUT)
            bytes_f = 2 * (m * K_IN + N_OUT * K_IN + m * N_OUT + r * (K_IN + N_OUT))
            for name, (tf, tfb) in times.items():
                rows.append({
                    "M": m, "r": r, "impl": name, "fwd_ms": tf, "fwdbwd_ms": tfb,
                    "fwd_tflops": flops_f / tf / 1e9, "fwdbwd_tflops": (flops_f + flops_b) / tfb / 1e9,
                    "fwd_gbs": bytes_f / tf / 1e6,
                    "fwd_overhead": tf / times["base"][0] - 1, "fwdbwd_overhead": tfb / times["base"][1] - 1,
                    "fwd_vs_peft": times["peft"][0] / tf, "fwdbwd_vs_peft": times["peft"][1] / tfb,
                })
            win = times["triton"][1] < 0.97 * times["composite"][1]
            table[bucket_key("lora_linear", m, K_IN, N_OUT, r, dtype)] = "triton" if win else "composite"
            table[bucket_key("lamda_linear", m, K_IN, N_OUT, r, dtype)] = "triton" if win else "composite"
    return rows, table


def cov_table() -> tuple[list[dict], dict[str, str]]:
    import lifelong.kernels as lk
    from lifelong.kernels.dispatch import bucket_key

    rows, table = [], {}
    for d in COV_D:
        x = torch.randn(COV_TOKENS, d, device=DEVICE, dtype=torch.bfloat16)
        c = torch.zeros(d, d, device=DEVICE)
        times = {"addmm_fp32": bench(lambda: c.addmm_(x.float().T, x.float()))}
        for backend in ("composite", "triton"):
            st = lk.CovState(d, device=DEVICE, min_tokens=0, backend=backend)
            times[backend] = bench(lambda: lk.cov_accumulate_(st, x))
        for name, t in times.items():
            rows.append({"d": d, "impl": name, "ms": t, "tokens_per_s": COV_TOKENS / t * 1e3,
                         "vs_addmm": times["addmm_fp32"] / t})
        win = times["triton"] < times["composite"] / 1.2  # the triangular kernel only where it wins by ≥ 1.2×
        table[bucket_key("cov_accumulate_", COV_TOKENS, d, d, 1, torch.bfloat16)] = "triton" if win else "composite"
    return rows, table


def check_cuda() -> list[str]:
    """Every op's Triton path vs float64 on the GPU (fp32 ieee, fp16, bf16): relative errors."""
    import lifelong.kernels as lk

    lines = []
    torch.manual_seed(0)
    m, k, n, r = 300, 520, 390, 16
    base = {"x": torch.randn(m, k), "w": torch.randn(n, k) / k ** 0.5, "b": torch.randn(n),
            "a": torch.randn(r, k) / k ** 0.5, "bb": torch.randn(n, r), "s": torch.randn(r, r) / r ** 0.5,
            "d": torch.randn(r, n), "gm": 1 + 0.1 * torch.randn(n), "bt": torch.randn(n), "g": torch.randn(m, n)}
    ops = {
        "lora": (["x", "a", "bb"], lambda t, be: lk.lora_linear(t["x"], t["w"], t["b"], t["a"], t["bb"], 0.5,
                                                                backend=be)),
        "lamda": (["x", "s", "bb"], lambda t, be: lk.lamda_linear(t["x"], t["w"], t["b"], t["a"], t["s"], t["bb"],
                                                                  0.5, backend=be)),
        "bone": (["x", "d"], lambda t, be: lk.bone_linear(t["x"], t["w"], t["b"], t["d"], r=r, backend=be)),
        "ssf": (["x", "gm", "bt"], lambda t, be: lk.ssf_linear(t["x"], t["w"], t["b"], t["gm"], t["bt"], backend=be)),
    }
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        for op, (names, fn) in ops.items():
            outs = {}
            for be, dt in (("composite", torch.float64), ("triton", dtype)):
                t = {key: v.to(DEVICE, dt).requires_grad_(key in names) for key, v in base.items()}
                y = fn(t, be)
                outs[be] = [y, *torch.autograd.grad(y, [t[nm] for nm in names], t["g"])]
            errs = [float((a.double() - b).norm() / b.norm()) for a, b in zip(outs["triton"], outs["composite"])]
            status = "ok" if max(errs) <= tol else "FAIL"
            lines.append(f"| {op} | {str(dtype).removeprefix('torch.')} | "
                         + " / ".join(f"{e:.1e}" for e in errs) + f" | {status} |")
    d = 700
    x = torch.randn(1000, d, device=DEVICE, dtype=torch.bfloat16)
    c = torch.zeros(d, d, device=DEVICE)
    lk.cov_update_(c, x, backend="triton")
    ref = x.double().T @ x.double()
    err = float((c.double() - ref).norm() / ref.norm())
    lines.append(f"| cov_update_ | bfloat16 | {err:.1e} | {'ok' if err <= 1e-5 else 'FAIL'} |")
    return lines


def markdown(card: str, checks: list[str], lora_rows: list[dict], cov_rows: list[dict]) -> str:
    out = [f"# lifelong.kernels benchmark — {card}", "", f"torch {torch.__version__}", "",
           "## Triton vs float64 (relative Frobenius error: forward / gradients)", "",
           "| op | dtype | errors | status |", "|---|---|---|---|", *checks, "",
           f"## LoRA linear, in = out = {K_IN}, bf16 (median ms, do_bench)", "",
           "| M | r | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd GB/s | fwd overhead "
           "| fwd+bwd overhead | fwd vs PEFT | fwd+bwd vs PEFT |", "|" + "---|" * 12]
    for row in lora_rows:
        out.append(f"| {row['M']} | {row['r']} | {row['impl']} | {row['fwd_ms']:.4f} | {row['fwdbwd_ms']:.4f} | "
                   f"{row['fwd_tflops']:.1f} | {row['fwdbwd_tflops']:.1f} | {row['fwd_gbs']:.0f} | "
                   f"{row['fwd_overhead']:+.1%} | {row['fwdbwd_overhead']:+.1%} | {row['fwd_vs_peft']:.2f}× | "
                   f"{row['fwdbwd_vs_peft']:.2f}× |")
    out += ["", f"## Covariance, {COV_TOKENS} bf16 tokens per update", "",
            "| d | impl | ms | tokens/s | vs addmm |", "|---|---|---|---|---|"]
    for row in cov_rows:
        out.append(f"| {row['d']} | {row['impl']} | {row['ms']:.4f} | {row['tokens_per_s']:.3g} | "
                   f"{row['vs_addmm']:.2f}× |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/kernels.md"), help="markdown table path")
    parser.add_argument("--write-table", action="store_true", help="write kernels/tuned/<gpu>.json for auto")
    parser.add_argument("--quick", action="store_true", help="skip M = 8192")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1: the interpreter cannot time kernels; nothing to benchmark.")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: the kernel benchmark needs a GPU; nothing to do.")
        return 0
    card = torch.cuda.get_device_name()
    print(f"device: {card}")
    checks = check_cuda()
    print("\n".join(checks))
    lora_rows, table = lora_table(args.quick)
    cov_rows, cov_tab = cov_table()
    text = markdown(card, checks, lora_rows, cov_rows)
    print(text)
    atomic_write(args.out, text)
    if args.write_table:
        from lifelong.kernels.dispatch import TUNED_DIR

        atomic_write(TUNED_DIR / (card.replace(" ", "_") + ".json"), json.dumps({**table, **cov_tab}, indent=1))
    return 1 if any("FAIL" in line for line in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
