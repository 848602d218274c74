"""CLASSP optimizer: the invariants of classp.md §6."""

import copy

import pytest
import torch

from lifelong.continual import CLASSP

torch.set_num_threads(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batches(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_no_scaling_no_threshold_equals_sgd():
    a, b = _model(), _model()
    pa = _train(a, CLASSP(a.parameters(), lr=0.1, threshold=0.0, apply_scaling=False), _batches())
    pb = _train(b, torch.optim.SGD(b.parameters(), lr=0.1), _batches())
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


def test_power_two_equals_adagrad():
    a, b = _model(), _model()
    pa = _train(a, CLASSP(a.parameters(), lr=0.05, threshold=0.0, power=2.0, eps=1e-20), _batches())
    pb = _train(b, torch.optim.Adagrad(b.parameters(), lr=0.05, eps=1e-10, initial_accumulator_value=0), _batches())
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_threshold_freezes_small_gradients_elementwise():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    opt = CLASSP([p], lr=0.1, threshold=0.25)
    p.grad = torch.tensor([0.1, -0.6, 0.5, 0.0])  # g² = 0.01, 0.36, 0.25, 0
    before = p.detach().clone()
    opt.step()
    s = opt.state[p]["grad_sum"]
    assert torch.equal(p.detach()[[0, 2, 3]], before[[0, 2, 3]])  # g² ≤ τ: untouched
    assert torch.equal(s[[0, 2, 3]], torch.zeros(3))
    # updated element, p = 1: step = α g / (ε + |g|)
    assert p.detach()[1].item() == pytest.approx(2.0 + 0.1 * 0.6 / (1e-5 + 0.6))


def test_accumulator_monotone_and_step_size_non_increasing():
    model = _model()
    opt = CLASSP(model.parameters(), lr=0.1, threshold=0.0, power=1.5)
    prev_sum, prev_lr = None, None
    for x, y in _batches(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        s = torch.cat([opt.state[p]["grad_sum"].flatten() for p in model.parameters()])
        eff = 0.1 / (1e-5 + s).pow(1 / 1.5)
        if prev_sum is not None:
            assert (s >= prev_sum).all() and (eff <= prev_lr).all()
        prev_sum, prev_lr = s, eff


def test_first_step_is_lr_times_sign():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = CLASSP([p], lr=0.2, threshold=0.0, eps=0.0, power=1.0)
    g = torch.tensor([0.3, -2.0, 1e-3, -0.5, 7.0])
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.detach(), -0.2 * torch.sign(g))


def test_state_survives_state_dict_round_trip():
    a = _model()
    opt = CLASSP(a.parameters(), lr=0.05, threshold=0.0)
    _train(a, opt, _batches(3))
    b = _model()
    b.load_state_dict(a.state_dict())
    opt2 = CLASSP(b.parameters(), lr=0.05, threshold=0.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as after torch.save/torch.load
    more = _batches(2, seed=9)
    pa, pb = _train(a, opt, more), _train(b, opt2, more)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


def test_params_without_grad_are_skipped():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = CLASSP([a, b], lr=0.1, threshold=0.0)
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state or "grad_sum" not in opt.state[b]
    assert torch.equal(b.detach(), torch.ones(3))


def _reference_step(p, g, s, lr, threshold, eps, power):
    """Re-implementation of the released CLASSP.py's two quirks (classp.md §3 items 1-2)."""
    if bool((g ** 2).any()) > threshold:
        s += g.abs()  # the ** power result is discarded in the reference
        p -= lr * g / (s + eps) ** (1 / power)
    return p, s


def test_reference_compat_reproduces_the_quirks():
    for threshold, power in ((0.5, 1.0), (0.5, 2.0), (1.5, 1.0)):
        model = _model()
        opt = CLASSP(model.parameters(), lr=0.1, threshold=threshold, power=power, reference_compat=True)
        ref = [(p.detach().clone(), torch.zeros_like(p)) for p in model.parameters()]
        for x, y in _batches(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            ref = [_reference_step(p, g, s, 0.1, threshold, 1e-5, power) for (p, s), g in zip(ref, grads)]
        for p, (rp, _) in zip(model.parameters(), ref):
            torch.testing.assert_close(p.detach(), rp, rtol=1e-6, atol=1e-7)
    # with τ ≥ 1 the reference never updates anything
    assert threshold == 1.5 and all(torch.equal(p.detach(), rp) for p, (rp, _) in zip(_model().parameters(), ref))


def _rule64(p, g, s, lr, threshold, eps, power, apply_scaling=True, include_current=True):
    """The rule of classp.md §2 element by element, in float64."""
    m = (g * g > threshold).double()
    inc = m * g.abs() ** power
    if not apply_scaling:
        return p - lr * m * g, s + inc
    denom = (eps + (s + inc if include_current else s)) ** (1 / power)
    return p - lr * m * g / denom, s + inc


@pytest.mark.parametrize("opts", [
    {"threshold": 1e-4, "power": 1.0}, {"threshold": 0.0, "power": 2.0},
    {"threshold": 1e-4, "power": 1.5, "include_current": False, "eps": 0.1}, {"threshold": 1e-4, "apply_scaling": False},
])
def test_flat_small_tensors_and_large_tensors_follow_the_rule(opts):
    """Tensors below 65,536 elements share one flat accumulator, larger ones go alone (in pieces of
    1,048,576 elements when contiguous): every path must give the rule's numbers, and the state must
    keep them through a state-dict round trip."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 300)), torch.nn.Parameter(torch.randn(1050, 1000)),
              torch.nn.Parameter(torch.randn(401, 400).t()), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(3, 4))]
    assert not params[2].is_contiguous()
    opt = CLASSP(params, lr=0.05, **opts)
    ref = [(p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64)) for p in params]
    rule = {k: v for k, v in {"eps": 1e-5, "power": 1.0, **opts}.items() if k != "threshold"}
    for step in range(3):
        grads = [torch.randn_like(p) * 0.05 for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if step == 2:  # a fresh optimizer from the saved state continues the same sums
            state = copy.deepcopy(opt.state_dict())
            opt = CLASSP(params, lr=0.05, **opts)
            opt.load_state_dict(state)
        opt.step()
        ref = [_rule64(rp, g.double(), rs, 0.05, opts["threshold"], **rule) for (rp, rs), g in zip(ref, grads)]
    for p, (rp, rs) in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), rp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["grad_sum"].double(), rs, rtol=1e-5, atol=1e-7)


def test_bad_options():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="power"):
        CLASSP(p, power=0.0)
    with pytest.raises(ValueError, match="threshold"):
        CLASSP(p, threshold=-1.0)
    with pytest.raises(ValueError, match="eps"):
        CLASSP(p, eps=-1e-3)
    with pytest.raises(ValueError, match="unknown"):
        CLASSP(p).set_mode(momentum=0.9)
