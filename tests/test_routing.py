"""Per-task adapter routing over any registry adapter (here Bone and SSF on a small MLP)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lifelong as ll
from lifelong.adapters.routing import TaskRoutedModel


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def routed() -> TaskRoutedModel:
    model = TaskRoutedModel(mlp(), "bone", r=2, target_modules=["0"])
    for task in (0, 1, 2):
        model.add_task(task)
    model.add_task("ssf", method="ssf", target_modules=["0", "2"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def reference_output(model: TaskRoutedModel, task, x) -> torch.Tensor:
    """What the plain core gives with that task's adapter set active."""
    plain = copy.deepcopy(model)
    ll.AdaptedModel.set_adapter(plain, plain.adapter_name(task))
    return ll.AdaptedModel.forward(plain, x)


def test_single_and_mixed_task_ids_match_the_core():
    model = routed()
    x = torch.randn(7, 6)
    ids = [2, 0, "ssf", 1, 0, 2, "ssf"]
    with torch.no_grad():
        mixed = model(x, task_id=ids)
        for task in (0, 1, 2, "ssf"):
            expected = reference_output(model, task, x)
            torch.testing.assert_close(model(x, task_id=task), expected, rtol=0, atol=0)
            rows = [i for i, t in enumerate(ids) if t == task]
            torch.testing.assert_close(mixed[rows], expected[rows], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(model(x, task_id=0), model(x, task_id=1))
    tensor_ids = torch.tensor([1, 1, 0, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, task_id=tensor_ids)[3], model(x, task_id=2)[3], rtol=1e-6, atol=1e-6)


def test_routing_does_not_change_what_trains():
    model = routed()
    model.set_task(1)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = torch.randn(6, 6), torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(x, task_id=[0, 1, 1, 2, 1, 0]), y).backward()
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".task_1." in n for n in with_grad)
    # forward without id uses the task chosen by set_task
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, task_id=1), rtol=0, atol=0)


def test_errors_and_persistence(tmp_path):
    model = routed()
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"holds 4 tasks"):
        model(x)
    with pytest.raises(ValueError, match=r"task 7 was never added; tasks: \[0, 1, 2, 'ssf'\]"):
        model(x, task_id=torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        model(x, task_id=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="int or a str"):
        model(x, task_id=[1.5, 0, 0])
    with pytest.raises(ValueError, match="needs an adapter method"):
        TaskRoutedModel(mlp()).add_task(0)
    model.save_pretrained(tmp_path)
    back = TaskRoutedModel.from_pretrained(mlp(), tmp_path)
    assert sorted(map(str, back.tasks)) == ["0", "1", "2", "ssf"]
    with torch.no_grad():
        ids = [0, "ssf", 2]
        torch.testing.assert_close(back(x, task_id=ids), model(x, task_id=ids), rtol=0, atol=0)
