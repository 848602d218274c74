"""lifelong.kernels on the CPU: hand-written backwards vs plain autograd (fp64), gradcheck,
torch vs composite, dispatch, bad input, covariance and projection. The Triton kernels are tested
under the interpreter in test_kernels_interp.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lifelong as ll
import lifelong.kernels as K
from lifelong.kernels import dispatch
from lifelong.kernels.reference import bat_delta, shard_sum

F64 = torch.float64


def keep_mask(shape: tuple[int, ...], p: float, seed: int) -> torch.Tensor:
    """The documented dropout contract: keep where ``rand(seed) >= p`` (independent re-derivation)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) >= p


def make(m: int, k: int, n: int, r: int, dtype=F64, seed: int = 0, bias: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, generator=gen, dtype=F64) * std).to(dtype).requires_grad_(grad)

    return {
        "x": rnd(m, k, grad=True), "w": rnd(n, k, std=k ** -0.5), "b": rnd(n) if bias else None,
        "a": rnd(r, k, std=k ** -0.5, grad=True), "bb": rnd(n, r, grad=True), "s": rnd(r, r, grad=True),
        "d": rnd(r, n, grad=True), "gamma": (1 + rnd(n, std=0.1)).detach().requires_grad_(True),
        "beta": rnd(n, grad=True), "g": rnd(m, n),
    }


def oracle(op: str, t: dict, p: float = 0.0, seed: int = 0, scale: float = 0.5, r: int = 0):
    """Plain autograd composition of the forward formulas (no custom Function involved)."""
    x, w, b = t["x"], t["w"], t["b"]
    xd = x if p == 0 else x * keep_mask(tuple(x.shape), p, seed).to(x.dtype) / (1 - p)
    if op == "lora":
        return F.linear(x, w, b) + scale * (xd @ t["a"].T) @ t["bb"].T
    if op == "lamda":
        return F.linear(x, w, b) + scale * ((xd @ t["a"].T) @ t["s"].T) @ t["bb"].T
    if op == "bone":
        return F.linear(x, w, b) + shard_sum(xd, r) @ t["d"][:r]
    return F.linear(x, w, b) * t["gamma"] + t["beta"]


def call(op: str, t: dict, backend: str, p: float = 0.0, seed: int = 0, scale: float = 0.5, r: int = 0, **kw):
    x, w, b = t["x"], t["w"], t["b"]
    if op == "lora":
        return K.lora_linear(x, w, b, t["a"], t["bb"], scale, dropout_p=p, seed=seed, backend=backend)
    if op == "lamda":
        return K.lamda_linear(x, w, b, t["a"], t["s"], t["bb"], scale, dropout_p=p, seed=seed, backend=backend)
    if op == "bone":
        return K.bone_linear(x, w, b, t["d"][:r], r=r, dropout_p=p, seed=seed, backend=backend)
    return K.ssf_linear(x, w, b, t["gamma"], t["beta"], backend=backend, **kw)


def params(op: str, t: dict) -> list[torch.Tensor]:
    return {"lora": [t["x"], t["a"], t["bb"]], "lamda": [t["x"], t["a"], t["s"], t["bb"]],
            "bone": [t["x"], t["d"]], "ssf": [t["x"], t["gamma"], t["beta"]]}[op]


def grads(fn, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    y = fn()
    got = torch.autograd.grad(y, [i for i in inputs if i.requires_grad], g)
    return [y.detach(), *got]


@pytest.mark.parametrize("backend", ["torch", "composite"])
@pytest.mark.parametrize("op,p,r", [("lora", 0.0, 3), ("lora", 0.3, 3), ("lamda", 0.0, 3), ("lamda", 0.25, 2),
                                    ("bone", 0.0, 3), ("bone", 0.2, 4), ("ssf", 0.0, 1)])
def test_manual_backward_matches_autograd_fp64(op: str, p: float, r: int, backend: str) -> None:
    t = make(7, 9, 6, 4)
    ins = params(op, t)
    got = grads(lambda: call(op, t, backend, p=p, seed=5, r=r), ins, t["g"])
    want = grads(lambda: oracle(op, t, p=p, seed=5, r=r), ins, t["g"])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a - b).abs().max()


@pytest.mark.parametrize("op,r", [("lora", 2), ("lamda", 3), ("bone", 3), ("ssf", 1)])
def test_gradcheck_reference_path(op: str, r: int) -> None:
    t = make(5, 7, 4, 3, seed=1)
    ins = params(op, t)

    def fn(*args):
        local = dict(t)
        keys = {"lora": ["x", "a", "bb"], "lamda": ["x", "a", "s", "bb"], "bone": ["x", "d"],
                "ssf": ["x", "gamma", "beta"]}[op]
        local.update(zip(keys, args))
        return call(op, local, "torch", p=0.3, seed=2, r=r) if op != "ssf" else call(op, local, "torch")

    assert torch.autograd.gradcheck(fn, tuple(ins), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_frozen_a_and_requires_grad_combinations_skip_work() -> None:
    t = make(6, 8, 5, 2)
    t["a"].requires_grad_(False)
    t["x"].requires_grad_(False)
    y = call("lamda", t, "torch")
    (ds,) = torch.autograd.grad(y, [t["s"]], t["g"])
    want = torch.autograd.grad(oracle("lamda", t), [t["s"]], t["g"])[0]
    assert torch.allclose(ds, want, atol=1e-12)
    assert y.grad_fn.next_functions is not None


def test_lamda_saves_no_input() -> None:
    """A frozen: LaMDA's backward keeps U (M×r), never x (M×in)."""
    t = make(6, 40, 5, 2)
    t["a"].requires_grad_(False)
    y = call("lamda", t, "torch")
    node = y.grad_fn.next_functions[0][0]  # past the reshape back to x's leading shape
    assert type(node).__name__ == "LaMDALinearFnBackward"
    saved = [s.shape for s in node.saved_tensors if s is not None]
    assert (6, 40) not in saved and (6, 2) in saved


def test_trainable_base_gets_its_gradient_through_autograd() -> None:
    t = make(4, 6, 5, 2)
    t["w"].requires_grad_(True)
    y = call("lora", t, "auto")
    (dw,) = torch.autograd.grad(y, [t["w"]], t["g"])
    assert torch.allclose(dw, t["g"].T @ t["x"], atol=1e-12)


@pytest.mark.parametrize("op", ["lora", "lamda", "bone", "ssf"])
def test_torch_and_composite_agree_fp32_3d_input(op: str) -> None:
    t = make(12, 10, 7, 4, dtype=torch.float32, seed=3)
    t["x"] = t["x"].detach().reshape(3, 4, 10).requires_grad_(True)
    t["g"] = t["g"].reshape(3, 4, 7)
    ins = params(op, t)
    a = grads(lambda: call(op, t, "torch", r=3), ins, t["g"])
    b = grads(lambda: call(op, t, "composite", r=3), ins, t["g"])
    assert a[0].shape == (3, 4, 7)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-5)


def test_lora_s_vec_equals_scaled_columns_and_zero_scale() -> None:
    t = make(5, 6, 4, 3)
    s_vec = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    y = K.lora_linear(t["x"], t["w"], t["b"], t["a"], t["bb"], 0.5, s_vec=s_vec)
    want = F.linear(t["x"], t["w"], t["b"]) + (t["x"] @ t["a"].T) @ (t["bb"] * 0.5 * s_vec).T
    assert torch.allclose(y, want, atol=1e-12)
    y0 = K.lora_linear(t["x"], t["w"], t["b"], t["a"], t["bb"], 0.0)
    assert torch.allclose(y0, F.linear(t["x"], t["w"], t["b"]), atol=1e-12)


def test_fp32_adapter_params_with_half_activations_cast_on_load() -> None:
    t = make(5, 8, 4, 2, dtype=torch.float32)
    x = t["x"].detach().to(torch.bfloat16).requires_grad_(True)
    y = K.lora_linear(x, t["w"].to(torch.bfloat16), None, t["a"], t["bb"], 1.0)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and t["a"].grad.dtype == torch.float32 and t["bb"].grad.dtype == torch.float32


def test_empty_input() -> None:
    t = make(0, 8, 4, 2)
    y = call("lora", t, "composite")
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(t["bb"].grad, torch.zeros(4, 2, dtype=F64))


def test_bone_mini_and_bat_variants() -> None:
    t = make(6, 8, 8, 2, seed=4)
    dm = torch.randn(4, 2, dtype=F64, requires_grad=True)
    y = K.bone_linear(t["x"], t["w"], t["b"], dm, r=4, variant="mini")
    want = F.linear(t["x"], t["w"], t["b"]) + shard_sum(t["x"], 4) @ dm.repeat(1, 4)
    assert torch.allclose(y, want, atol=1e-12)
    (g_dm,) = torch.autograd.grad(y, [dm], t["g"][:, :8])
    full = shard_sum(t["x"], 4).T @ t["g"][:, :8]
    assert torch.allclose(g_dm, full.reshape(4, 4, 2).sum(1), atol=1e-12)
    tb = torch.randn(2, 4, 4, dtype=F64)
    yb = K.bone_linear(t["x"], t["w"], t["b"], tb, r=4, variant="bat")
    w = t["w"].clone()
    for p in range(2):
        for q in range(2):
            blk = w[p * 4:(p + 1) * 4, q * 4:(q + 1) * 4]
            w[p * 4:(p + 1) * 4, q * 4:(q + 1) * 4] = blk @ (torch.eye(4, dtype=F64) + tb[p]) + tb[p]
    assert torch.allclose(yb, F.linear(t["x"], w, t["b"]), atol=1e-12)
    assert torch.allclose(bat_delta(t["w"], tb), w - t["w"], atol=1e-12)


def test_ssf_recompute_and_zero_gamma() -> None:
    t = make(5, 6, 4, 1)
    ins = params("ssf", t)
    a = grads(lambda: call("ssf", t, "torch", save="recompute"), ins, t["g"])
    b = grads(lambda: oracle("ssf", t), ins, t["g"])
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-10)
    with torch.no_grad():
        t["gamma"][1] = 0.0
    a = grads(lambda: call("ssf", t, "composite"), ins, t["g"])
    b = grads(lambda: oracle("ssf", t), ins, t["g"])
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-12)


@pytest.mark.parametrize("bad,match", [
    (lambda t: K.lora_linear(t["x"], t["w"], None, t["a"][:, :3], t["bb"], 1.0), r"lora_a has shape \(4, 3\)"),
    (lambda t: K.lora_linear(t["x"], t["w"], None, t["a"], t["bb"][:, :2], 1.0), r"lora_b has shape \(5, 2\)"),
    (lambda t: K.lora_linear(t["x"][:, :4], t["w"], None, t["a"], t["bb"], 1.0), r"x has shape \(6, 4\)"),
    (lambda t: K.lora_linear(t["x"].float(), t["w"], None, t["a"], t["bb"], 1.0), "weight has dtype"),
    (lambda t: K.lora_linear(t["x"], t["w"], None, t["a"], t["bb"], 1.0, dropout_p=1.0), "dropout_p"),
    (lambda t: K.lora_linear(t["x"], t["w"], None, t["a"], t["bb"], 1.0, backend="cuda"), "backend must be one of"),
    (lambda t: K.lora_linear(t["x"], t["w"], None, t["a"], t["bb"], 1.0, backend="triton"), "TRITON_INTERPRET"),
    (lambda t: K.lamda_linear(t["x"], t["w"], None, t["a"], t["s"][:2], t["bb"], 1.0), r"lora_s has shape"),
    (lambda t: K.bone_linear(t["x"], t["w"], None, t["d"], r=3), r"block has shape \(4, 5\)"),
    (lambda t: K.bone_linear(t["x"], t["w"], None, t["d"], r=4, variant="bad"), "variant must be one of"),
    (lambda t: K.bone_linear(t["x"], t["w"], None, t["d"], r=4, variant="bat"), "divisible by r"),
    (lambda t: K.ssf_linear(t["x"], t["w"], None, t["gamma"][:3], t["beta"]), r"gamma has shape \(3,\)"),
    (lambda t: K.ssf_linear(t["x"], t["w"], None, t["gamma"], t["beta"], save="y"), "save must be one of"),
])
def test_bad_input_errors(bad, match: str) -> None:
    t = make(6, 8, 5, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(t)


def test_dispatch_defaults_and_override(monkeypatch) -> None:
    x = torch.zeros(2, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.resolve(None, "lora_linear", (x,), (2, 3, 3, 1)) == "torch"
    with K.use_backend("composite"):
        assert dispatch.resolve(None, "lora_linear", (x,), (2, 3, 3, 1)) == "composite"
        assert dispatch.resolve("torch", "lora_linear", (x,), (2, 3, 3, 1)) == "torch"
    monkeypatch.setenv("LIFELONG_KERNEL_BACKEND", "composite")
    assert dispatch.resolve(None, "lora_linear", (x,), (2, 3, 3, 1)) == "composite"
    monkeypatch.setenv("LIFELONG_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve(None, "lora_linear", (x,), (2, 3, 3, 1))
    assert dispatch.rank_pad(1) == 16 and dispatch.rank_pad(17) == 32 and dispatch.rank_pad(64) == 64


# ---- covariance --------------------------------------------------------------------------------


@pytest.mark.parametrize("min_tokens", [0, 16, 1000])
def test_cov_state_masked_weighted_matches_fp64(min_tokens: int) -> None:
    gen = torch.Generator().manual_seed(0)
    d = 13
    xs = [torch.randn(2, 5, d, generator=gen) for _ in range(4)]
    masks = [torch.rand(2, 5, generator=gen) > 0.3 for _ in range(4)]
    st = K.CovState(d, track_mean=True, min_tokens=min_tokens)
    want = torch.zeros(d, d, dtype=F64)
    rows = []
    for i, (x, m) in enumerate(zip(xs, masks)):
        w = 2.0 if i == 2 else None
        K.cov_accumulate_(st, x, row_mask=m, weight=w)
        sel = x.reshape(-1, d)[m.reshape(-1)].double()
        want += (w or 1.0) * sel.T @ sel
        rows.append(sel)
    assert int(st.tokens) == sum(int(m.sum()) for m in masks) and int(st.calls) == 4
    c = K.cov_finalize(st, normalize=None)
    assert torch.equal(c, c.T)
    assert torch.allclose(c.double(), want, rtol=1e-5, atol=1e-4)
    n = int(st.tokens)
    assert torch.allclose(K.cov_finalize(st, normalize="calls").double(), want / 4, rtol=1e-5, atol=1e-5)
    allrows = torch.cat(rows)
    st2 = K.CovState(d, track_mean=True, min_tokens=min_tokens)
    K.cov_accumulate_(st2, allrows.float())
    centered = K.cov_finalize(st2, center=True).double()
    assert torch.allclose(centered, torch.cov(allrows.T, correction=0), rtol=1e-4, atol=1e-5)
    assert n == allrows.shape[0]


def test_cov_state_errors_and_nonfinite() -> None:
    st = K.CovState(4)
    with pytest.raises(ValueError, match="width d=4"):
        K.cov_accumulate_(st, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="row_mask has shape"):
        K.cov_accumulate_(st, torch.zeros(3, 4), row_mask=torch.ones(2, dtype=torch.bool))
    K.cov_accumulate_(st, torch.tensor([[1.0, float("nan"), 0, 0]]), row_mask=torch.tensor([False]))
    K.cov_accumulate_(st, torch.ones(2, 4))
    assert torch.allclose(K.cov_finalize(st), torch.ones(4, 4))  # the masked NaN row is ignored
    K.cov_accumulate_(st, torch.tensor([[1.0, float("inf"), 0, 0]]))
    with pytest.raises(ValueError, match="non-finite"):
        K.cov_finalize(st)
    with pytest.raises(ValueError, match="track_mean"):
        K.cov_finalize(K.CovState(4), center=True)
    weighted = K.CovState(4, track_mean=True)
    K.cov_accumulate_(weighted, torch.ones(2, 4), weight=3.0)
    with pytest.raises(ValueError, match="weighted"):
        K.cov_finalize(weighted, center=True)


def test_cov_update_in_place() -> None:
    x = torch.randn(9, 6, dtype=F64)
    c = torch.eye(6, dtype=F64)
    out = K.cov_update_(c, x)
    assert out is c and torch.allclose(c, torch.eye(6, dtype=F64) + x.T @ x, atol=1e-12)
    with pytest.raises(ValueError, match="do not chain"):
        K.cov_update_(c, torch.zeros(3, 5))


def test_cov_product_overwrites_out_and_matches_a_float64_product() -> None:
    x = torch.randn(11, 5)
    out = torch.full((5, 5), float("nan"))  # stale contents must not leak in
    got = K.cov_product(x, out=out)
    assert got is out
    torch.testing.assert_close(out.double(), x.double().T @ x.double(), rtol=1e-6, atol=1e-6)
    fresh = K.cov_product(x.double())
    assert fresh.dtype == F64 and torch.allclose(fresh, x.double().T @ x.double(), atol=1e-12)
    with pytest.raises(ValueError, match="do not chain"):
        K.cov_product(x, out=torch.empty(4, 4))


# ---- subspace projection -----------------------------------------------------------------------


def test_subspace_project_properties() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 10, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(10, 3, generator=gen, dtype=F64))
    out = K.subspace_project(w, q)
    onto = K.subspace_project(w, q, mode="onto")
    assert (out.double() @ q).norm() / w.norm() <= 1e-6
    assert torch.allclose(out + onto, w, atol=1e-6)
    assert torch.allclose(K.subspace_project(out, q), out, atol=1e-6)  # idempotent
    assert torch.allclose(onto.double(), w.double() @ q @ q.T, atol=1e-6)
    wb = w.to(torch.bfloat16)
    assert K.subspace_project(wb, q).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="do not chain"):
        K.subspace_project(w, q[:5])


# ---- adapters: identical outputs whichever backend runs them -------------------------------------


def adapted(method: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
    m = ll.wrap(model, method, target_modules=["0", "2"], **kw)
    with torch.no_grad():  # non-trivial adapter tensors (zero init would hide every bug)
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("method,kw", [("bone", {"r": 4}), ("lamda", {"r": 4}), ("ssf", {})])
def test_adapters_same_output_any_backend(method: str, kw: dict) -> None:
    m = adapted(method, **kw)
    x = torch.randn(3, 5, 12)
    outs, grads_ = [], []
    for backend in ("torch", "composite"):
        with K.use_backend(backend):
            y = m(x)
            y.square().sum().backward()
        outs.append(y.detach())
        grads_.append([p.grad.clone() for p in m.trainable_parameters()])
        m.zero_grad()
    with torch.no_grad(), m.disable_adapter():
        assert not torch.allclose(m(x), outs[0], atol=1e-3)  # the adapter really changes the output
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads_):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(outs[0].sum()))


def test_lora_linear_matches_peft_lora_layer() -> None:
    """Same numbers as PEFT's LoRA Linear (B random: PEFT's zero init would hide the branch)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(10, 7))
    model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_()
    x = torch.randn(3, 5, 10)
    want = layer(x)
    base = layer.base_layer
    for backend in ("torch", "composite"):
        y = K.lora_linear(x, base.weight, base.bias, lora_a, lora_b, layer.scaling["default"], backend=backend)
        assert torch.allclose(y, want, rtol=1e-5, atol=1e-6)


def test_argument_checks_use_the_shared_wording() -> None:
    from lifelong.kernels.covariance import CovState

    with pytest.raises(ValueError, match=r"CovState: d must be a positive integer, got 3\.0"):
        CovState(3.0)
    with pytest.raises(ValueError, match=r"CovState: d must be a positive integer, got True"):
        CovState(True)
    with pytest.raises(ValueError, match=r"CovState: min_tokens must be an integer >= 0, got -1"):
        CovState(4, min_tokens=-1)
    t = make(6, 8, 5, 4)
    with pytest.raises(ValueError, match=r"bone_linear: r must be a positive integer, got 0"):
        K.bone_linear(t["x"], t["w"], None, t["d"], r=0)
    with pytest.raises(ValueError, match=r"bone_linear: r must be <= in_features=8, got 9"):
        K.bone_linear(t["x"], t["w"], None, t["d"], r=9)
