"""Every adapter and every kernel op under ``torch.autocast`` with fp32 weights.

An autocast activation (bf16 on the CPU; fp16 and bf16 on CUDA) meets fp32 base and adapter
weights: forward and backward must run and agree with the run without autocast to within the
autocast dtype's rounding.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import MODELS, run

import lifelong as ll
import lifelong.kernels as K
from lifelong.adapters import get_method

CUDA = torch.cuda.is_available()
# Relative tolerances: bf16 keeps 8 bits of mantissa (~4e-3 per rounding), fp16 11 bits.
FWD_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_TOL = {torch.bfloat16: 1e-1, torch.float16: 2e-2}


def kinds_for(method: str) -> list[str]:
    types = get_method(method).adapter_cls.layer_types
    return [k for k in ("mlp", "cnn", "llama") if any(issubclass(t, types) for t in MODELS[k].layer_types)]


CASES = [pytest.param(m, k, id=f"{m}-{k}") for m in ll.available() for k in kinds_for(m)]


def adapted(method: str, kind: str, device: str) -> tuple[torch.nn.Module, object]:
    spec = get_method(method)
    model = MODELS[kind].make()
    calib = MODELS[kind].batches(2)
    options = dict(spec.adapter_cls.example_options(model, calib))
    if "r" in {f.name for f in dataclasses.fields(spec.config_cls)}:
        options.setdefault("r", 4)
    if method == "lamda":
        options["total_steps"] = 10
    # eval(): BatchNorm on running statistics, so a conv bias still gets a gradient
    model = ll.wrap(model, method, **options).to(device).eval()
    torch.manual_seed(3)
    with torch.no_grad():  # away from init, so every trainable tensor gets a non-trivial gradient
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = MODELS[kind].batches(1, seed=1)[0]  # not the calibration data (KORE's null space)
    batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(device)
    return model, batch


def forward_backward(model: torch.nn.Module, batch: object, dtype: torch.dtype | None, device: str):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = run(model, batch)
    out.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_trainable_parameters() if p.grad is not None}
    return out.detach().float(), grads


def check_close(model, batch, dtype, device) -> None:
    ref, ref_grads = forward_backward(model, batch, None, device)
    out, grads = forward_backward(model, batch, dtype, device)
    assert ref_grads and set(grads) == set(ref_grads)
    fwd = float((out - ref).abs().max() / ref.abs().max())
    assert fwd < FWD_TOL[dtype], f"forward relative error {fwd:.3g} under {dtype} autocast"
    for name, g in ref_grads.items():
        assert grads[name].dtype == torch.float32, name  # gradients stay in the parameter's dtype
        err = float((grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < GRAD_TOL[dtype], f"{name}: gradient relative error {err:.3g} under {dtype} autocast"


@pytest.mark.parametrize("method,kind", CASES)
def test_adapter_under_cpu_bf16_autocast(method: str, kind: str) -> None:
    model, batch = adapted(method, kind, "cpu")
    check_close(model, batch, torch.bfloat16, "cpu")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method,kind", CASES)
def test_adapter_under_cuda_autocast(method: str, kind: str, dtype: torch.dtype) -> None:
    model, batch = adapted(method, kind, "cuda")
    check_close(model, batch, dtype, "cuda")


def op_call(op: str, t: dict, backend: str) -> torch.Tensor:
    if op == "lora":
        return K.lora_linear(t["x"], t["w"], t["b"], t["a"], t["bb"], 0.5, backend=backend)
    if op == "lamda":
        return K.lamda_linear(t["x"], t["w"], t["b"], t["a"], t["s"], t["bb"], 0.5, backend=backend)
    if op == "bone":
        return K.bone_linear(t["x"], t["w"], t["b"], t["d"], r=4, backend=backend)
    return K.ssf_linear(t["x"], t["w"], t["b"], t["gamma"], t["beta"], backend=backend)


TRAINABLE = {"lora": ["x", "a", "bb"], "lamda": ["x", "s", "bb"], "bone": ["x", "d"], "ssf": ["x", "gamma", "beta"]}


def op_tensors(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (2, 5, 24), "w": (20, 24), "b": (20,), "a": (4, 24), "bb": (20, 4), "s": (4, 4), "d": (4, 20),
              "gamma": (20,), "beta": (20,)}
    t = {k: (torch.randn(*s, generator=g) * 0.3).to(device) for k, s in shapes.items()}
    t["gamma"] += 1.0
    return t


def op_grads(op: str, backend: str, device: str, dtype: torch.dtype | None, x_dtype: torch.dtype):
    t = op_tensors(device)
    t["x"] = t["x"].to(x_dtype)
    for name in TRAINABLE[op]:
        t[name].requires_grad_(True)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        y = op_call(op, t, backend)
    y.float().sum().backward()
    return y.detach().float(), {n: t[n].grad for n in TRAINABLE[op]}, y.dtype


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("backend", ["torch", "composite"])
@pytest.mark.parametrize("op", ["lora", "lamda", "bone", "ssf"])
def test_ops_accept_autocast_activation_with_fp32_weights(op: str, backend: str, x_dtype: torch.dtype) -> None:
    ref, ref_grads, _ = op_grads(op, backend, "cpu", None, torch.float32)
    out, grads, out_dtype = op_grads(op, backend, "cpu", torch.bfloat16, x_dtype)
    assert out_dtype == torch.bfloat16  # what F.linear gives under autocast
    assert float((out - ref).abs().max() / ref.abs().max()) < 3e-2
    for name, g in ref_grads.items():
        assert grads[name].dtype == (x_dtype if name == "x" else torch.float32), name
        assert float((grads[name].float() - g).norm() / g.norm()) < 5e-2, name


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "composite", "triton"])
@pytest.mark.parametrize("op", ["lora", "lamda", "bone", "ssf"])
def test_ops_under_cuda_autocast(op: str, backend: str, dtype: torch.dtype) -> None:
    ref, ref_grads, _ = op_grads(op, backend, "cuda", None, torch.float32)
    out, grads, out_dtype = op_grads(op, backend, "cuda", dtype, torch.float32)
    assert out_dtype == dtype
    assert float((out - ref).abs().max() / ref.abs().max()) < FWD_TOL[dtype]
    for name, g in ref_grads.items():
        assert float((grads[name].float() - g).norm() / g.norm()) < GRAD_TOL[dtype], name


def test_autocast_leaves_the_caller_model_in_fp32() -> None:
    model, batch = adapted("lamda", "mlp", "cpu")
    before = copy.deepcopy({n: p.dtype for n, p in model.named_parameters()})
    forward_backward(model, batch, torch.bfloat16, "cpu")
    assert {n: p.dtype for n, p in model.named_parameters()} == before
