"""The Triton kernels of lifelong.kernels, run by triton's interpreter on the CPU.

``triton.jit`` decides between compiled and interpreted mode when a kernel is decorated, from
``TRITON_INTERPRET``; flipping it inside a running pytest process is fragile (kernels already decorated stay compiled). So
this module has two faces:

- in a normal run (variable unset) it holds one test that re-runs this very file with pytest in a
  fresh subprocess whose environment sets ``TRITON_INTERPRET=1`` before anything imports triton,
  and asserts that run passed (its log, with the triton/numpy versions, is shown on failure);
- in that subprocess (or in a CI job that exports ``TRITON_INTERPRET=1``) it holds the real tests:
  every kernel through the ops' ``backend="triton"`` against a float64 oracle, forward and every
  gradient, fp32/fp16 (bf16 through the UPCAST switch), odd shapes, r ∈ {1, 8, 16, 64}, bias and
  dropout on/off, guard bands, determinism, gradcheck, and the adapters across backends.

Error criterion (FlashAttention's): ``max|kernel − ref64| ≤ 2·max|torch_same_dtype − ref64| +
floor·max|ref64|``, plus a per-dtype ceiling on the relative Frobenius error; NaN never passes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

if not INTERP:

    @pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
    def test_triton_kernels_under_interpreter() -> None:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "TRITON_INTERPRET": "1", "LIFELONG_KERNELS_STRICT": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("LIFELONG_KERNEL_BACKEND", None)
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider", "-rA"],
            cwd=root, env=env, capture_output=True, text=True, timeout=900,
        )
        log = proc.stdout[-8000:] + proc.stderr[-4000:]
        assert proc.returncode == 0, log
        assert " passed" in proc.stdout and " failed" not in proc.stdout, log

else:
    import torch
    import torch.nn.functional as F
    import triton
    from torch import nn

    import lifelong as ll
    import lifelong.kernels as K
    from lifelong.kernels import triton_kernels as tk
    from lifelong.kernels.reference import shard_sum

    F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
    FLOOR = {F32: 1e-6, F16: 2e-4, BF16: 2e-3, F64: 1e-12}
    CEILING = {F32: 1e-5, F16: 5e-3, BF16: 3e-2, F64: 1e-10}

    def test_versions_recorded() -> None:
        import numpy

        print(f"triton {triton.__version__} numpy {numpy.__version__} torch {torch.__version__}")
        assert tk.INTERPRET and len(tk.GEMM_CONFIGS) == 1 and len(tk.COV_CONFIGS) == 1

    def close_enough(out: torch.Tensor, ref: torch.Tensor, same: torch.Tensor, dtype: torch.dtype, what: str) -> None:
        assert out.shape == ref.shape, (what, out.shape, ref.shape)
        if ref.numel() == 0:
            return
        out, ref, same = out.double(), ref.double(), same.double()
        scale = ref.abs().max().item()
        err = (out - ref).abs().max().item()
        base = (same - ref).abs().max().item()
        assert err <= 2 * base + FLOOR[dtype] * scale + 1e-300, f"{what}: err {err:.3g} vs torch {base:.3g}"
        rel = ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
        assert rel <= CEILING[dtype], f"{what}: relative error {rel:.3g}"

    def tensors(m: int, k: int, n: int, r: int, bias: bool, seed: int, rows: int | None = None) -> dict:
        gen = torch.Generator().manual_seed(seed)

        def rnd(*shape, std=1.0):
            return torch.randn(*shape, generator=gen, dtype=F64) * std

        t = {"x": rnd(m, k), "w": rnd(n, k, std=k ** -0.5), "b": rnd(n) if bias else None,
             "a": rnd(r, k, std=k ** -0.5), "bb": rnd(n, r), "s": rnd(r, r, std=r ** -0.5), "d": rnd(r, n),
             "gamma": 1 + rnd(n, std=0.1), "beta": rnd(n), "g": rnd(m, n)}
        return t

    def keep_mask(shape, p: float, seed: int) -> torch.Tensor:
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= p

    def oracle(op: str, t: dict, p: float, seed: int, scale: float, r: int, mini_r: int | None):
        x, w, b = t["x"], t["w"], t["b"]
        xd = x if p == 0 else x * keep_mask(tuple(x.shape), p, seed).to(x.dtype) / (1 - p)
        if op == "lora":
            return F.linear(x, w, b) + scale * (xd @ t["a"].T) @ t["bb"].T
        if op == "lamda":
            return F.linear(x, w, b) + scale * ((xd @ t["a"].T) @ t["s"].T) @ t["bb"].T
        if op == "bone":
            d = t["d"] if mini_r is None else t["d"][:, :mini_r].repeat(1, w.shape[0] // mini_r)
            return F.linear(x, w, b) + shard_sum(xd, r) @ d
        return F.linear(x, w, b) * t["gamma"] + t["beta"]

    TRAINABLE = {"lora": ["x", "a", "bb"], "lamda": ["x", "s", "bb"], "bone": ["x", "d"], "ssf": ["x", "gamma", "beta"]}

    def run(op: str, t: dict, dtype, backend, p, seed, scale, r, mini_r, save="z"):
        """Forward and all gradients of the op in ``dtype`` through ``backend`` (or the oracle)."""
        ts = {k: (v.to(dtype).clone() if v is not None else None) for k, v in t.items()}
        names = TRAINABLE[op]
        for name in names:
            ts[name].requires_grad_(True)
        if backend is None:
            y = oracle(op, ts, p, seed, scale, r, mini_r)
        elif op == "lora":
            y = K.lora_linear(ts["x"], ts["w"], ts["b"], ts["a"], ts["bb"], scale, dropout_p=p, seed=seed,
                              backend=backend)
        elif op == "lamda":
            y = K.lamda_linear(ts["x"], ts["w"], ts["b"], ts["a"], ts["s"], ts["bb"], scale, dropout_p=p,
                               seed=seed, backend=backend)
        elif op == "bone":
            block = ts["d"] if mini_r is None else ts["d"][:, :mini_r]
            y = K.bone_linear(ts["x"], ts["w"], ts["b"], block, r=r, variant="bone" if mini_r is None else "mini",
                              dropout_p=p, seed=seed, backend=backend)
        else:
            y = K.ssf_linear(ts["x"], ts["w"], ts["b"], ts["gamma"], ts["beta"], save=save, backend=backend)
        gs = torch.autograd.grad(y, [ts[n] for n in names], ts["g"], allow_unused=True)
        return [y.detach(), *gs]

    # (op, M, K, N, r, dtype, bias, dropout p, scale, mini_r)
    CASES = [
        ("lora", 33, 40, 24, 8, F32, True, 0.0, 0.5, None),
        ("lora", 7, 130, 65, 1, F32, False, 0.0, -2.0, None),
        ("lora", 65, 40, 65, 16, F16, True, 0.25, 0.5, None),
        ("lora", 33, 130, 24, 64, F32, True, 0.0, 0.5, None),
        ("lora", 33, 64, 24, 64, F16, True, 0.1, 0.5, None),
        ("lora", 1, 16, 24, 8, BF16, True, 0.0, 0.5, None),
        ("lora", 33, 40, 24, 16, F16, False, 0.0, 0.0, None),
        ("lora", 0, 40, 24, 8, F32, True, 0.0, 0.5, None),
        ("lamda", 33, 40, 24, 8, F32, True, 0.0, 0.5, None),
        ("lamda", 65, 130, 24, 16, F16, False, 0.2, 2.0, None),
        ("lamda", 7, 64, 65, 64, BF16, True, 0.0, 0.5, None),
        ("lamda", 33, 40, 24, 1, F32, True, 0.0, -2.0, None),
        ("bone", 33, 40, 24, 7, F32, True, 0.0, 1.0, None),
        ("bone", 33, 130, 65, 16, F16, False, 0.2, 1.0, None),
        ("bone", 7, 64, 24, 64, BF16, True, 0.0, 1.0, None),
        ("bone", 33, 40, 24, 1, F32, True, 0.0, 1.0, None),
        ("bone", 33, 40, 24, 8, F32, False, 0.0, 1.0, 6),
        ("ssf", 33, 40, 24, 1, F32, True, 0.0, 1.0, None),
        ("ssf", 65, 130, 65, 1, F16, False, 0.0, 1.0, None),
        ("ssf", 7, 40, 24, 1, BF16, True, 0.0, 1.0, None),
    ]

    @pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v).removeprefix("torch.") for v in c))
    def test_kernel_matches_float64_reference(case) -> None:
        op, m, k, n, r, dtype, bias, p, scale, mini_r = case
        t = tensors(m, k, n, r, bias, seed=m + k + n + r)
        if op == "ssf" and dtype == BF16:
            t["gamma"][3] = 0.0  # a zero scale entry
        ref = run(op, t, F64, None, p, 7, scale, r, mini_r)
        same = run(op, t, dtype, "torch", p, 7, scale, r, mini_r)
        got = run(op, t, dtype, "triton", p, 7, scale, r, mini_r)
        for i, (a, b, c) in enumerate(zip(got, ref, same)):
            what = f"{op} {'y' if i == 0 else 'd' + TRAINABLE[op][i - 1]}"
            assert torch.isfinite(a).all(), what
            close_enough(a, b, c, dtype, what)

    def test_ssf_recompute_matches() -> None:
        t = tensors(33, 40, 24, 1, True, seed=3)
        ref = run("ssf", t, F64, None, 0.0, 0, 1.0, 1, None)
        same = run("ssf", t, F32, "torch", 0.0, 0, 1.0, 1, None, save="recompute")
        got = run("ssf", t, F32, "triton", 0.0, 0, 1.0, 1, None, save="recompute")
        for a, b, c in zip(got, ref, same):
            close_enough(a, b, c, F32, "ssf recompute")

    def test_strided_inputs_3d_and_transposed_weight() -> None:
        """Row-strided x slice, 3-D x, W given as a transposed view, a strided bias: same answer."""
        t = tensors(24, 40, 24, 8, True, seed=11)
        big = torch.randn(24, 50, dtype=F32)
        big[:, 5:45] = t["x"].float()
        x = big[:, 5:45].reshape(2, 12, 40)  # inner stride 1, row stride 50
        w_t = t["w"].float().T.contiguous()  # (K, N) storage; .T is the (N, K) weight view
        a, bb = t["a"].float(), t["bb"].float()
        bias_buf = torch.zeros(48)
        bias_buf[::2] = t["b"].float()
        y = K.lora_linear(x, w_t.T, bias_buf[::2], a, bb, 0.5, backend="triton")  # strided bias too
        want = oracle("lora", t, 0.0, 0, 0.5, 8, None).reshape(2, 12, 24)
        assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)

    def test_s_vec_per_rank_scale() -> None:
        t = tensors(17, 40, 24, 8, True, seed=5)
        s_vec = torch.linspace(-1, 2, 8)
        y = K.lora_linear(t["x"].float(), t["w"].float(), t["b"].float(), t["a"].float(), t["bb"].float(), 0.5,
                          s_vec=s_vec, backend="triton")
        want = F.linear(t["x"], t["w"], t["b"]) + (t["x"] @ t["a"].T) @ (t["bb"] * 0.5 * s_vec.double()).T
        assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)

    def guarded(shape: tuple[int, int], dtype=F32, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """A NaN-filled buffer and the (shape) view inside it, away from every edge."""
        buf = torch.full((shape[0] + 2 * pad, shape[1] + 2 * pad), float("nan"), dtype=dtype)
        return buf, buf[pad:pad + shape[0], pad:pad + shape[1]]

    def guard_intact(buf: torch.Tensor, pad: int = 3) -> bool:
        inner = torch.zeros_like(buf, dtype=torch.bool)
        inner[pad:buf.shape[0] - pad, pad:buf.shape[1] - pad] = True
        return bool(torch.isnan(buf[~inner]).all())

    def test_no_out_of_bounds_reads_or_writes() -> None:
        """Inputs sit inside NaN guard bands (an unmasked read would bring NaN in) and the output
        is written into a NaN-poisoned view (an unmasked write would touch the guard)."""
        m, kd, n, r = 37, 45, 29, 5
        gen = torch.Generator().manual_seed(0)
        vals = {name: torch.randn(*shape, generator=gen) for name, shape in
                (("p", (m, kd)), ("q", (kd, n)), ("l", (m, r)), ("r", (r, n)), ("v", (m, r)))}
        views = {}
        for name, v in vals.items():
            _, view = guarded(tuple(v.shape))
            view.copy_(v)
            views[name] = view
        out_buf, out = guarded((m, n))
        scale = torch.full((r,), 0.5)
        bias = torch.randn(n)
        tk.gemm_lowrank(views["p"], views["q"], lr=(views["l"], views["r"], scale), bias=bias, out=out)
        want = vals["p"] @ vals["q"] + 0.5 * vals["l"] @ vals["r"] + bias
        assert torch.isfinite(out).all() and guard_intact(out_buf)
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)
        out_buf, out = guarded((m, n))
        tk.gemm_lowrank(views["p"], views["q"], tadd=views["v"], out=out)
        tiled = vals["v"].repeat(1, -(-n // r))[:, :n]
        assert guard_intact(out_buf) and torch.allclose(out, vals["p"] @ vals["q"] + tiled, rtol=1e-5, atol=1e-5)
        g = views["p"][:, :n]
        du, db = tk.dy_pass(g, views["r"].T, views["l"], scale)
        assert torch.allclose(du, 0.5 * vals["p"][:, :n] @ vals["r"].T, rtol=1e-5, atol=1e-5)
        assert torch.allclose(db, 0.5 * vals["p"][:, :n].T @ vals["l"], rtol=1e-5, atol=1e-5)
        c_buf, c = guarded((kd, kd))
        c.zero_()
        tk.cov_tri(c, views["p"], mirror=True)
        assert guard_intact(c_buf) and torch.allclose(c, vals["p"].T @ vals["p"], rtol=1e-5, atol=1e-4)

    def test_dy_pass_atomic_and_deterministic_forms() -> None:
        gen = torch.Generator().manual_seed(1)
        g, b, u = torch.randn(70, 40, generator=gen), torch.randn(40, 8, generator=gen), torch.randn(70, 8, generator=gen)
        sv = torch.linspace(0.5, 1.5, 8)
        du_a, db_a = tk.dy_pass(g, b, u, sv, atomic=True)
        du_d, db_d = tk.dy_pass(g, b, u, sv, atomic=False)
        du_d2, db_d2 = tk.dy_pass(g, b, u, sv, atomic=False)
        want_db = (g.double().T @ u.double()) * sv.double()
        assert torch.allclose(db_a.double(), want_db, rtol=1e-5, atol=1e-5)
        assert torch.allclose(db_d.double(), want_db, rtol=1e-5, atol=1e-5)
        assert torch.equal(db_d, db_d2) and torch.equal(du_d, du_d2)
        assert torch.allclose(du_a.double(), (g.double() @ b.double()) * sv.double(), rtol=1e-5, atol=1e-5)

    def test_gradcheck_triton_path_fp64() -> None:
        t = tensors(5, 9, 6, 3, True, seed=2)
        x, a, bb = (t[k].clone().requires_grad_(True) for k in ("x", "a", "bb"))

        def fn(x_, a_, b_):
            return K.lora_linear(x_, t["w"], t["b"], a_, b_, 0.7, dropout_p=0.3, seed=4, backend="triton")

        # Deterministic mode selects the two-stage dB reduction, so repeated backwards agree bitwise
        # (gradcheck's reentrancy check has zero tolerance).
        torch.use_deterministic_algorithms(True)
        try:
            assert torch.autograd.gradcheck(fn, (x, a, bb), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
        finally:
            torch.use_deterministic_algorithms(False)

    @pytest.mark.parametrize("d,dtype", [(16, F32), (70, F16), (130, BF16)])
    def test_covariance_kernel(d: int, dtype) -> None:
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(3, 23, d, generator=gen).to(dtype)
        mask = torch.rand(3, 23, generator=gen) > 0.25
        st = K.CovState(d, min_tokens=32, backend="triton")
        for i in range(3):
            K.cov_accumulate_(st, x[i], row_mask=mask[i], weight=0.5 if i == 1 else None)
        sel = [x[i][mask[i]].double() for i in range(3)]
        want = sel[0].T @ sel[0] + 0.5 * sel[1].T @ sel[1] + sel[2].T @ sel[2]
        c = K.cov_finalize(st, normalize=None)
        assert torch.equal(c, c.T) and int(st.tokens) == int(mask.sum())
        assert torch.allclose(c.double(), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
        full = torch.zeros(d, d)
        K.cov_update_(full, x[0])
        xd = x[0].double()
        assert torch.allclose(full.double(), xd.T @ xd, rtol=1e-5, atol=1e-4 * d)
        stale = torch.full((d, d), float("nan"))
        K.cov_product(x[0], out=stale, backend="triton")
        assert torch.allclose(stale.double(), xd.T @ xd, rtol=1e-5, atol=1e-4 * d)

    @pytest.mark.parametrize("method,kw", [("bone", {"r": 4}), ("lamda", {"r": 4}), ("ssf", {})])
    def test_adapters_same_output_any_backend(method: str, kw: dict) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
        m = ll.wrap(model, method, target_modules=["0", "2"], **kw)
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(3, 5, 12)
        outs, grads = [], []
        for backend in ("torch", "triton", "auto"):
            with K.use_backend(backend):
                y = m(x)
                y.square().sum().backward()
            outs.append(y.detach())
            grads.append([p.grad.clone() for p in m.trainable_parameters()])
            m.zero_grad()
        assert torch.equal(outs[1], outs[2])  # auto under the interpreter is the triton path
        assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads[0], grads[1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("method,kw", [("bone", {"r": 4}), ("lora", {"r": 4}), ("lamda", {"r": 4}), ("ssf", {})])
    def test_adapters_under_bf16_autocast_on_the_triton_backend(method: str, kw: dict) -> None:
        """fp32 weights and a bf16 autocast region: the triton path runs forward and backward
        and agrees with the fp32 run to bf16 rounding."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
        if method == "lora":  # KORE's adapter is LoRA-shaped; zero_b needs no null-space quality
            batches = [torch.randn(40, 12)]
            m = ll.wrap(model, "kore", target_modules=["0"], calibration=batches, init="zero_b", null_tol=1.0,
                        progress=False, **kw)
        else:
            m = ll.wrap(model, method, target_modules=["0", "2"], **kw)
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(3, 5, 12)
        runs = []
        for amp in (False, True):
            with K.use_backend("triton"), torch.autocast("cpu", dtype=BF16, enabled=amp):
                y = m(x)
            y.float().square().sum().backward()
            runs.append((y.detach().float(), [p.grad.clone() for p in m.trainable_parameters()]))
            m.zero_grad()
        (y0, g0), (y1, g1) = runs
        assert float((y1 - y0).abs().max() / y0.abs().max()) < 3e-2
        for a, b in zip(g0, g1):
            assert b.dtype == F32 and float((a - b).norm() / a.norm()) < 5e-2

    def test_rank_above_triton_limit_falls_back_with_one_warning() -> None:
        t = tensors(5, 300, 6, 300, True, seed=0)
        args = [t[k].float() for k in ("x", "w", "b", "a", "bb")]
        with pytest.warns(RuntimeWarning, match="exceeds the Triton limit"):
            y = K.lora_linear(*args, 0.5, backend="triton")
        assert torch.allclose(y.double(), oracle("lora", t, 0.0, 0, 0.5, 300, None), rtol=1e-4, atol=1e-4)
