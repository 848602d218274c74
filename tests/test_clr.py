"""CLR: identity at init, the spec's ResNet-18 counts, hand-computed depthwise maps, zero forgetting."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lifelong as ll
from lifelong.adapters.clr import CLRModel, clr_parameter_count


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.short = nn.Conv2d(4, 6, 1, stride=2)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + self.short(h))
        return self.head(h.mean(dim=(2, 3)))


def small(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_resnet18_counts_match_the_spec(resnet):
    counts = {}
    for variant in ("clr", "clr-full"):
        model = ll.wrap(copy.deepcopy(resnet), "clr", variant=variant)
        counts[variant] = clr_parameter_count(model, "default")
    assert counts["clr"]["clr_layers"] == 17 and counts["clr"]["clr"] == 35_136
    assert counts["clr-full"]["clr_layers"] == 20 and counts["clr-full"]["clr"] == 43_200
    assert counts["clr"]["bn_affine"] == 9_600 and counts["clr"]["bn_stats"] == 9_600
    backbone = sum(p.numel() for n, p in resnet.named_parameters() if not n.startswith("fc."))
    assert backbone == 11_176_512
    assert round(100 * 35_136 / backbone, 2) == 0.31  # spec: 0.31% without BN
    assert round(100 * (35_136 + 9_600) / backbone, 2) == 0.40  # with BN affine


def test_dirac_init_is_identity_and_keeps_shapes(resnet):
    x = torch.randn(2, 3, 32, 32)
    model = ll.wrap(copy.deepcopy(resnet), "clr")
    with torch.no_grad():
        assert torch.equal(model(x), resnet(x))
    shapes = {}
    for layer in model.adapted_layers():
        adapter = layer.adapters["default"]
        if not adapter.is_head:
            layer.register_forward_hook(lambda m, i, o, name=adapter.layer_name: shapes.update({name: o.shape}))
            layer.base_layer.register_forward_hook(lambda m, i, o, name=adapter.layer_name: shapes.update({name + "/base": o.shape}))
    with torch.no_grad():
        model(x)
    assert len(shapes) == 34 and all(shapes[n] == shapes[n + "/base"] for n in shapes if "/" not in n)


def test_reprogramming_is_a_per_channel_3x3_filter():
    model = ll.wrap(small(), "clr", init="random")
    layer = model.base_model.conv2
    kernel = layer.adapters["default"].kernel.detach()
    x = torch.randn(2, 4, 6, 6)
    z = layer.base_layer(x)
    zp = F.pad(z, (1, 1, 1, 1))
    expected = torch.zeros_like(z)
    for u in range(3):
        for v in range(3):
            expected += kernel[:, 0, u, v].view(1, -1, 1, 1) * zp[:, :, u:u + z.shape[2], v:v + z.shape[3]]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert "short" not in {l.adapters["default"].layer_name for l in model.adapted_layers()}  # 1×1 skipped


def test_reduced_v2_scale_merges_exactly_and_kxk_refuses():
    model = ll.wrap(small(), "clr", variant="reduced-v2", init="random")
    short = model.base_model.short.adapters["default"]
    assert short.kernel.shape == (6, 1, 1, 1) and short.mergeable
    x = torch.randn(2, 4, 6, 6)
    layer = model.base_model.short
    live = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), live, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    with pytest.raises(ValueError, match="not a conv on the border"):
        model.merge()


def test_training_task2_leaves_task1_bitwise_unchanged():
    base = small()
    model = CLRModel(copy.deepcopy(base), reg_lambda=1e-3)
    model.add_task(1, num_classes=2)
    model.set_task(1)
    x1, y1 = torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,))
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        optimiser.zero_grad()
        (F.cross_entropy(model(x1, task_id=1), y1) + model.regularization()).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        before = model(x1, task_id=1)
    task1_state = {k: v.clone() for k, v in model.adapter_state_dict("task_1").items()}
    anchor = {k: v.clone() for k, v in model.base_model.state_dict().items() if "adapters" not in k and "copies" not in k}
    model.add_task(2, num_classes=3)
    model.set_task(2)
    model.train()
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    x2, y2 = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(3):
        optimiser.zero_grad()
        F.cross_entropy(model(x2, task_id=2), y2).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x1, task_id=1), before)
    for k, v in model.adapter_state_dict("task_1").items():
        assert torch.equal(v, task1_state[k]), k  # kernels, head, BN affine and running stats
    for k, v in model.base_model.state_dict().items():
        if k in anchor:
            assert torch.equal(v, anchor[k]), k
    assert any(not torch.equal(v, task1_state[k.replace("task_2", "task_1")])
               for k, v in model.adapter_state_dict("task_2").items() if "running_mean" in k)


def test_per_sample_task_ids_route_each_row():
    model = CLRModel(small(), init="random")
    model.add_task(0, num_classes=2)
    model.add_task(1, num_classes=3)
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    ids = torch.tensor([1, 0, 0, 1, 1])
    with torch.no_grad():
        mixed = model(x, task_id=ids)
        a, b = model(x, task_id=0), model(x, task_id=1)
    assert mixed.shape == (5, 3)
    torch.testing.assert_close(mixed[ids == 1], b[ids == 1])
    torch.testing.assert_close(mixed[ids == 0, :2], a[ids == 0])
    assert torch.isinf(mixed[ids == 0, 2]).all()


def test_bad_inputs(resnet):
    with pytest.raises(ValueError, match="no?ne"):
        CLRModel(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="Conv2d"):
        ll.wrap(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), "clr", target_modules=".*")
    model = CLRModel(small())
    model.add_task("a", num_classes=2)
    model.add_task("b", num_classes=2)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="pass task_id"):
        model(x)
    with pytest.raises(ValueError, match="never added"):
        model(x, task_id="c")
    with pytest.raises(ValueError, match="already has an adapter"):
        model.add_task("a", num_classes=2)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ll.wrap(copy.deepcopy(resnet), "clr", kernel_size=2)


def test_save_and_reload_tasks(tmp_path):
    model = CLRModel(small(), init="random")
    model.add_task(0, num_classes=2)
    model.add_task(1, num_classes=3)
    model.save_pretrained(tmp_path)
    back = CLRModel.from_pretrained(small(), tmp_path)
    assert sorted(back.tasks) == [0, 1]
    x, ids = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x, task_id=ids), model.eval()(x, task_id=ids), rtol=0, atol=0)
