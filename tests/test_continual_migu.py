"""MIGU gradient masking: the invariants of migu.md §6."""

import copy

import pytest
import torch
from torch import nn

from lifelong.continual import MIGU, Context, migu_mask

torch.set_num_threads(1)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def _batches(n=4, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def _train(model, opt, batches, migu=None):
    losses, grads = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if migu is not None:
            migu.mask_gradients()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        if migu is not None:
            migu.after_step()
        losses.append(loss.item())
    return losses, grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_mask_ratio_zero_is_plain_training(opt_cls):
    a, b = _mlp(), _mlp()
    migu = MIGU(mask_ratio=0.0, start_task=0).attach(a)
    ra = _train(a, opt_cls(a.parameters(), lr=0.05), _batches(), migu)
    rb = _train(b, opt_cls(b.parameters(), lr=0.05), _batches())
    assert ra[0] == rb[0]
    for ga, gb in zip(ra[1], rb[1]):
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert all(torch.equal(x, y) for x, y in zip(ra[2], rb[2]))


def _known_layer(scales):
    """A linear layer whose output unit j has magnitude scales[j] · Σx on positive inputs."""
    layer = nn.Linear(3, len(scales), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(scales).unsqueeze(1).repeat(1, 3))
    return layer


def test_exact_count_and_top_rows():
    scales = [0.5, 3.0, -2.0, 0.1, 1.0, -4.0, 0.2, 2.5, 0.05, 1.5]  # |m| ranking: 5,1,7,2,9,4,0,6,3,8
    layer = _known_layer(scales)
    migu = MIGU(mask_ratio=0.7, start_task=0).attach(layer)
    x = torch.rand(5, 3) + 0.1
    layer(x).pow(2).sum().backward()  # every gradient row is nonzero
    migu.mask_gradients()
    masks = migu.masks()
    kept = (layer.weight.grad.abs().sum(1) != 0).nonzero().squeeze(1).tolist()
    assert len(kept) == 10 - int(0.7 * 10) == 3
    assert sorted(kept) == [1, 5, 7]
    assert masks[""].nonzero().squeeze(1).tolist() == [1, 5, 7]


def test_ties_keep_lower_index():
    m = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert migu_mask(m, 0.6).nonzero().squeeze(1).tolist() == [1, 2]


def test_sgd_masked_rows_frozen_kept_rows_plain_update():
    a = _mlp()
    b = copy.deepcopy(a)
    migu = MIGU(mask_ratio=0.5, start_task=0).attach(a)
    x, y = _batches(1)[0]
    for model, use in ((a, True), (b, False)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        nn.functional.cross_entropy(model(x), y).backward()
        if use:
            migu.mask_gradients()
            masks = migu.masks()
        opt.step()
    for idx in ("0", "2"):
        keep = masks[idx]
        before = _mlp()[int(idx)].weight.detach()
        after_a, after_b = a[int(idx)].weight.detach(), b[int(idx)].weight.detach()
        assert torch.equal(after_a[~keep], before[~keep])
        assert torch.equal(after_a[keep], after_b[keep])
    assert torch.equal(a[0].bias.detach(), b[0].bias.detach())  # bias gradient not masked by default


def test_forward_unchanged_and_untargeted_grads_untouched():
    a, b = _mlp(), _mlp()
    MIGU(mask_ratio=0.7, start_task=0, target_modules=["0"]).attach(a)
    x, y = _batches(1)[0]
    assert torch.equal(a(x), b(x))
    migu = MIGU(mask_ratio=0.7, start_task=0, target_modules=["0"]).attach(a)
    for model in (a, b):
        nn.functional.cross_entropy(model(x), y).backward()
    migu.mask_gradients()
    assert torch.equal(a[2].weight.grad, b[2].weight.grad)
    assert not torch.equal(a[0].weight.grad, b[0].weight.grad)


def _mask_of(layer, x, ratio=0.6):
    migu = MIGU(mask_ratio=ratio, start_task=0).attach(layer)
    layer(x).sum().backward()
    migu.mask_gradients()
    return migu.masks()[""]


def test_input_scale_invariance_and_permutation_equivariance():
    torch.manual_seed(0)
    layer = nn.Linear(5, 12)
    x = torch.randn(7, 5)
    m1 = _mask_of(copy.deepcopy(layer), x)
    m2 = _mask_of(copy.deepcopy(_no_bias(layer)), x)
    m3 = _mask_of(copy.deepcopy(_no_bias(layer)), 3.5 * x)
    assert torch.equal(m2, m3)
    perm = torch.randperm(12)
    permuted = copy.deepcopy(layer)
    with torch.no_grad():
        permuted.weight.copy_(layer.weight[perm])
        permuted.bias.copy_(layer.bias[perm])
    assert torch.equal(_mask_of(permuted, x), m1[perm])


def _no_bias(layer):
    out = nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        out.weight.copy_(layer.weight)
    return out


def test_accumulators_reset_and_eval_forwards_ignored():
    model = _mlp()
    migu = MIGU(mask_ratio=0.5, start_task=0).attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    migu.mask_gradients()
    opt.step()
    migu.after_step()
    assert migu.magnitudes() == {}
    x2 = torch.randn(30, 6) * 10
    with torch.no_grad():
        model(x2)
    model.eval()
    model(x2)
    model.train()
    assert migu.magnitudes() == {}
    model(x)
    expected = {k: v.clone() for k, v in migu.magnitudes().items()}
    migu.after_step()
    model(x)
    assert all(torch.equal(expected[k], v) for k, v in migu.magnitudes().items())


def test_accumulation_equals_big_batch():
    x = torch.randn(8, 6)
    a, b = _mlp(), _mlp()
    ma = MIGU(mask_ratio=0.6, start_task=0).attach(a)
    mb = MIGU(mask_ratio=0.6, start_task=0).attach(b)
    a(x[:4]).sum().backward()
    a(x[4:]).sum().backward()
    b(x).sum().backward()
    ma.mask_gradients()
    mb.mask_gradients()
    masks_a, masks_b = ma.masks(), mb.masks()
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_b)


def test_magnitudes_of_unbatched_and_3d_forwards_sum_over_every_row():
    torch.manual_seed(0)
    layer = nn.Linear(3, 5)
    migu = MIGU(mask_ratio=0.4, start_task=0).attach(layer)
    v, seq = torch.randn(3), torch.randn(2, 4, 3)
    layer(v)
    layer(seq)
    with torch.no_grad():
        expected = layer(v).abs() + layer(seq).abs().sum(dim=(0, 1))
    torch.testing.assert_close(migu.magnitudes()[""], expected)


def test_token_normalisation_option():
    layer = _known_layer([1.0, 2.0, 3.0])
    migu = MIGU(mask_ratio=0.0, normalize="token", start_task=0).attach(layer)
    layer(torch.ones(4, 3))
    m = migu.magnitudes()[""]
    torch.testing.assert_close(m, torch.tensor([1 / 6, 2 / 6, 3 / 6]) * 4)


def test_lora_b_mask_follows_full_layer_output():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6, bias=False))
    with torch.no_grad():
        base[0].weight.zero_()
        base[0].weight[3] = 50.0  # the frozen base dominates output unit 3
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=True))
    wrapper = model.base_model.model[0]
    with torch.no_grad():
        wrapper.lora_B["default"].weight.normal_()
        wrapper.lora_B["default"].weight[3] = 0.0  # B's own output at unit 3 is 0
    migu = MIGU(mask_ratio=5 / 6, start_task=0).attach(model)
    names = sorted(t.name for t in migu.targets)
    assert any(n.endswith("lora_A.default") for n in names) and any(n.endswith("lora_B.default") for n in names)
    x = torch.rand(5, 4) + 0.1
    model(x).sum().backward()
    migu.mask_gradients()
    masks = migu.masks()
    b_mask = next(v for k, v in masks.items() if k.endswith("lora_B.default"))
    assert b_mask.nonzero().squeeze(1).tolist() == [3]
    a_mask = next(v for k, v in masks.items() if k.endswith("lora_A.default"))
    assert a_mask.numel() == 2


def test_lifelong_adapter_rows():
    import lifelong as ll

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    calib = [torch.randn(16, 6) for _ in range(2)]
    model = ll.wrap(base, "corda", r=3, target_modules=["0"], calibration=calib)
    migu = MIGU(mask_ratio=0.5, start_task=0, target_modules="all-linear").attach(model)
    kinds = {t.name.rsplit(".", 1)[-1]: (t.from_input, tuple(t.weight.shape)) for t in migu.targets}
    assert kinds["lora_A"] == (True, (3, 6)) and kinds["lora_B"] == (False, (10, 3))
    x = torch.randn(8, 6)
    model(x).sum().backward()
    migu.mask_gradients()
    masks = migu.masks()
    b_name = next(t.name for t in migu.targets if t.name.endswith("lora_B"))
    lora_b = next(t.weight for t in migu.targets if t.name.endswith("lora_B"))
    nonzero_rows = (lora_b.grad.abs().sum(1) != 0)
    assert nonzero_rows.sum() <= 5 and torch.equal(nonzero_rows & ~masks[b_name], torch.zeros_like(nonzero_rows))
    # the full wrapped-layer output decides lora_B's rows
    wrapped = model.base_model[0]
    with torch.no_grad():
        full = wrapped(x).abs().sum(0)
    assert torch.equal(masks[b_name], migu_mask(full, 0.5))


def test_start_task_and_full_masking():
    model = _mlp()
    migu = MIGU(mask_ratio=1.0, start_task=1)
    migu.before_experience(Context(model=model, experience=0, experiences=[]))
    assert not migu.attached
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    migu.mask_gradients()
    assert migu.masks() == {}
    assert model[0].weight.grad.abs().sum() > 0
    migu.before_experience(Context(model=model, experience=1, experiences=[]))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    migu.mask_gradients()
    assert model[0].weight.grad.abs().sum() == 0 and model[2].weight.grad.abs().sum() == 0
    migu.after_experience(Context(model=model, experience=1, experiences=[]))
    assert not migu.attached


def test_freeze_masked_updates_restores_rows_under_adam():
    model = _mlp()
    migu = MIGU(mask_ratio=0.5, start_task=0, freeze_masked_updates=True).attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for x, y in _batches(3):
        before = model[0].weight.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        migu.mask_gradients()
        masks = migu.masks()
        opt.step()
        migu.after_step()
        assert torch.equal(model[0].weight.detach()[~masks["0"]], before[~masks["0"]])


def test_tied_embedding_is_skipped_and_bad_inputs():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight
            self.mid = nn.Linear(4, 4)

        def forward(self, t):
            return self.head(self.mid(self.emb(t)))

    with pytest.warns(UserWarning, match="tied"):
        migu = MIGU(start_task=0).attach(Tied())
    assert [t.name for t in migu.targets] == ["mid"]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            MIGU(mask_ratio=bad)
    with pytest.raises(ValueError, match="normalize"):
        MIGU(normalize="l2")
    with pytest.raises(ValueError, match="no trainable linear"):
        MIGU(target_modules=["nothing"]).attach(_mlp())
    with pytest.raises(TypeError, match="nn.Linear"):
        MIGU(target_modules=["1"]).attach(_mlp())


def test_hf_trainer_callback_masks_one_step():
    import warnings

    from transformers import Trainer, TrainingArguments

    from lifelong.continual import ContinualCallback
    from trainer_doubles import DictData, TinyNet

    torch.manual_seed(0)
    model = TinyNet()
    before = model.net[0].weight.detach().clone()
    migu = MIGU(mask_ratio=0.75, start_task=0)
    callback = ContinualCallback(migu, task_index=0)
    args = TrainingArguments(output_dir="/tmp/lifelong_hf_migu", per_device_train_batch_size=32, num_train_epochs=1,
                             learning_rate=0.1, optim="sgd", max_grad_norm=0.0, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", lr_scheduler_type="constant",
                             disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=DictData(32, 0), callbacks=[callback]).train()
    changed = (model.net[0].weight.detach() != before).any(1)
    assert int(changed.sum()) == 12 - int(0.75 * 12)  # one optimizer step: exactly the kept rows moved
    assert not migu.attached


def test_layers_of_equal_width_are_masked_like_each_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
    plain = copy.deepcopy(model)
    migu = MIGU(mask_ratio=0.4, start_task=0).attach(model)
    x = torch.randn(8, 6)
    model(x).sum().backward()
    plain(x).sum().backward()
    with torch.no_grad():  # the magnitudes recomputed by hand, layer by layer
        h0 = model[0](x)
        h2 = model[2](model[1](h0))
        h4 = model[4](model[3](h2))
    migu.mask_gradients()
    masks = migu.masks()
    for name, h in (("0", h0), ("2", h2), ("4", h4)):
        expected = migu_mask(h.abs().sum(0), 0.4)
        assert torch.equal(masks[name], expected)
        grad, reference = model[int(name)].weight.grad, plain[int(name)].weight.grad
        assert torch.equal(grad[expected], reference[expected])
        assert not grad[~expected].any()


def test_masked_non_finite_gradient_rows_become_zero():
    layer = _known_layer([1.0, 2.0, 3.0, 4.0])
    migu = MIGU(mask_ratio=0.5, start_task=0).attach(layer)
    layer(torch.ones(2, 3)).sum().backward()
    layer.weight.grad[0] = float("nan")  # unit 0 has the smallest magnitude: it is masked
    migu.mask_gradients()
    assert torch.equal(layer.weight.grad[:2], torch.zeros(2, 3))
    assert bool(torch.isfinite(layer.weight.grad).all())


def test_mask_ratio_changed_after_attach_is_used_at_the_next_step():
    torch.manual_seed(0)
    layer = nn.Linear(4, 10)
    migu = MIGU(mask_ratio=0.2, start_task=0).attach(layer)
    layer(torch.randn(3, 4)).sum().backward()
    assert int((~migu.masks()[""]).sum()) == 2
    migu.mask_ratio = 0.7
    assert int((~migu.masks()[""]).sum()) == 7
