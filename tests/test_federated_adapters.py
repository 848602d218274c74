"""Federated adapters: a registry adapter is the trained part, only its tensors travel."""
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import lifelong as ll
import lifelong.federated as fl
from lifelong.adapters.registry import get_method


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    return TensorDataset(x[:500], y[:500]), TensorDataset(x[1500:], y[1500:])


def trainable_adapter_bytes(model) -> int:
    """Independent count: the trainable tensors inside the AdaptedLayers' adapters."""
    total = 0
    for module in model.modules():
        if isinstance(module, ll.adapters.AdaptedLayer):
            for p in module.adapters.parameters():
                if p.requires_grad:
                    total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("method, options", [("bone", {"r": 4}), ("ssf", {}), ("lamda", {"r": 4}),
                                             ("corda", None)])
def test_only_adapter_tensors_are_sent_and_counted(digits, method, options):
    train, test = digits
    base = MLP()
    if options is None:  # calibrated methods supply their own example options
        batches = [(train.tensors[0][:32], train.tensors[1][:32])]
        options = get_method(method).adapter_cls.example_options(base, batches)
    model = fl.federate_adapter(base, method, target_modules=["fc1", "fc2"], **options)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    per_upload = trainable_adapter_bytes(model)
    assert 0 < per_upload == fl.adapter_bytes(model)
    assert per_upload < sum(p.numel() * 4 for p in base.parameters()) + per_upload
    res = fl.simulate(model, train, fl.AFACD(local_lr=0.05, server_lr=1.0, buffer_size=2),
                      num_workers=4, steps=2, test_data=test, local_steps=fl.FixedSteps(1),
                      eval_every=2, max_concurrent=2, record_arrivals=True, progress=False)
    uploads = len(res.arrivals)
    assert res.history[-1]["uplink_bytes"] == uploads * per_upload
    assert res.history[-1]["downlink_bytes"] == sum(res.jobs_started) * per_upload
    assert sum(t.numel() * t.element_size() for t in res.final_params.values()) == per_upload
    for name, value in model.named_parameters():   # the frozen base never moved
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    held = fl.trainable_params(model)   # the model ends holding the final global adapter
    assert all(torch.equal(v, held[n]) for n, v in res.final_params.items())


def test_federate_adapter_leaves_only_adapter_tensors_trainable():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.extra = nn.Parameter(torch.zeros(3))  # not targeted

        def forward(self, x):
            return self.fc1(x) + self.extra.sum()

    adapted = fl.federate_adapter(Odd(), "ssf", target_modules=["fc1"])
    names = sorted(fl.trainable_params(adapted))
    assert names and all(".adapters." in n for n in names), names
    assert fl.adapter_bytes(adapted) == trainable_adapter_bytes(adapted) == 2 * 8 * 4
