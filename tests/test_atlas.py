"""aTLAS (arXiv 2407.02880): composition, merging, saving and coefficients against direct weight arithmetic."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lifelong as ll
from lifelong.adapters import atlas, atlas_objectives, task_vectors


def toy(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def dyadic(model: nn.Module, seed: int) -> nn.Module:
    """Weights on a 1/64 grid in [-1, 1]: θ1 − θ0 and θ0 + τ are then exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-64, 65, p.shape, generator=g).float() / 64)
    return model


def set_coefficients(model: ll.AdaptedModel, value) -> None:
    """value(i, block_name, current) -> new coefficient tensor for task vector i."""
    with torch.no_grad():
        for layer in model.adapted_layers():
            adapter = layer.adapters[model.active_adapter]
            for attr in adapter.block_attrs:
                coef = adapter.coefficient(attr)
                for i in range(coef.shape[0]):
                    coef[i] = value(i, f"{adapter.layer_name}.{attr}", coef[i])


def compose_by_hand(base: nn.Module, tvs: list[dict], lam) -> nn.Module:
    """θ0 + Σ_i lam(i, name) τ_i written into a copy of the base model."""
    out = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in out.named_parameters():
            for i, tv in enumerate(tvs):
                p.add_(lam(i, name) * tv[name])
    return out


@pytest.fixture
def setup():
    base = toy(0)
    tvs = [task_vectors.task_vector(toy(s), base) for s in (1, 2, 3)]
    return base, tvs


def test_zero_coefficients_equal_base_exactly(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs)
    x = torch.randn(6, 4)
    assert torch.equal(model(x), base(x))


def test_one_task_vector_at_one_reproduces_finetuned():
    base, ft = dyadic(toy(0), 0), dyadic(toy(1), 1)
    tv = task_vectors.task_vector(ft, base)
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=[tv], tv_dtype="float32")
    set_coefficients(model, lambda i, b, c: torch.ones_like(c))
    x = torch.randn(6, 4)
    assert torch.equal(model(x), ft(x))  # exact: dyadic weights make θ0 + (θ1 − θ0) = θ1
    general = ll.wrap(copy.deepcopy(toy(0)), "atlas", task_vectors=[task_vectors.task_vector(toy(1), toy(0))], tv_dtype="float32")
    set_coefficients(general, lambda i, b, c: torch.ones_like(c))
    torch.testing.assert_close(general(x), toy(1)(x), rtol=0, atol=1e-6)


def test_block_coefficients_match_hand_composition_and_merge(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, tv_dtype="float32")
    lam = {(i, b): 0.1 * (i + 1) * (1 + len(b)) * (-1) ** i for i in range(3) for b in ("0.weight", "0.bias", "2.weight", "2.bias")}
    set_coefficients(model, lambda i, b, c: torch.full_like(c, lam[i, b]))
    x = torch.randn(6, 4)
    expected = compose_by_hand(base, tvs, lambda i, name: lam[i, name])(x)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    live = model(x)
    before = {n: p.clone() for n, p in base.named_parameters()}
    model.merge()
    torch.testing.assert_close(model(x), live, rtol=0, atol=1e-6)
    model.unmerge()
    for layer, idx in zip(model.adapted_layers(), ("0", "2")):
        assert torch.equal(layer.base_layer.weight, before[f"{idx}.weight"])
    plain = model.merge_and_unload()
    for name, p in plain.named_parameters():
        expected_p = before[name] + sum(lam[i, name] * tvs[i][name] for i in range(3))
        torch.testing.assert_close(p, expected_p, rtol=0, atol=1e-6)


def test_uniform_blocks_equal_global_and_partitions_equal_blocks(setup):
    base, tvs = setup
    x = torch.randn(6, 4)
    alphas = [0.3, -0.2, 0.5]
    block = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, tv_dtype="float32")
    set_coefficients(block, lambda i, b, c: torch.full_like(c, alphas[i]))
    glob = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, tv_dtype="float32", granularity="global")
    assert sum(p.numel() for p in glob.trainable_parameters()) == 3
    with torch.no_grad():
        next(glob.trainable_parameters()).copy_(torch.tensor(alphas))
    torch.testing.assert_close(block(x), glob(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(block(x), compose_by_hand(base, tvs, lambda i, n: alphas[i])(x), rtol=0, atol=1e-6)
    part = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, tv_dtype="float32", granularity="partition", partitions=5)
    assert sum(p.numel() for p in part.trainable_parameters()) == 3 * 4 * 5
    per_block = {(i, b): 0.1 * (i + 1) + 0.01 * len(b) for i in range(3) for b in ("0.weight", "0.bias", "2.weight", "2.bias")}
    set_coefficients(block, lambda i, b, c: torch.full_like(c, per_block[i, b]))
    set_coefficients(part, lambda i, b, c: torch.full_like(c, per_block[i, b]))
    torch.testing.assert_close(part(x), block(x), rtol=0, atol=1e-6)


def test_partition_groups_are_a_reproducible_partition(setup):
    base, tvs = setup
    part = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, granularity="partition", partitions=4)
    adapter = part.base_model[0].adapters["default"]
    ids = adapter.get_buffer("part_weight").long()
    onehot = F.one_hot(ids, 4)
    assert torch.equal(onehot.sum(-1), torch.ones_like(ids))  # each element in exactly one group
    assert set(ids.unique().tolist()) == {0, 1, 2, 3}
    again = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, granularity="partition", partitions=4)
    assert torch.equal(again.base_model[0].adapters["default"].get_buffer("part_weight"), ids.to(torch.int16))
    # Reference quirk: equal shapes share a mask; share_masks_by_shape=False gives each block its own.
    twin = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tv = {n: torch.ones_like(p) for n, p in twin.named_parameters()}
    shared = ll.wrap(copy.deepcopy(twin), "atlas", task_vectors=[tv], granularity="partition", partitions=3)
    own = ll.wrap(copy.deepcopy(twin), "atlas", task_vectors=[tv], granularity="partition", partitions=3, share_masks_by_shape=False)
    ids_of = lambda m, i: m.base_model[i].adapters["default"].get_buffer("part_weight")  # noqa: E731
    assert torch.equal(ids_of(shared, 0), ids_of(shared, 1))
    assert not torch.equal(ids_of(own, 0), ids_of(own, 1))


def test_reference_partition_leaves_non_2d_blocks_unchanged(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, tv_dtype="float32", granularity="partition",
                    partitions=2, reference_partition=True)
    set_coefficients(model, lambda i, b, c: torch.ones_like(c))
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain[0].bias, base[0].bias, rtol=0, atol=0)
    torch.testing.assert_close(plain[0].weight, base[0].weight + sum(tv["0.weight"] for tv in tvs), rtol=0, atol=1e-6)


def test_coefficient_count_is_n_times_m():
    model = ll.wrap(toy(0), "atlas", task_vectors=[task_vectors.task_vector(toy(s), toy(0)) for s in (1, 2, 3)])
    assert sum(p.numel() for p in model.trainable_parameters()) == 12  # 3 vectors × 4 blocks
    weights = ll.wrap(toy(0), "atlas", task_vectors=[task_vectors.task_vector(toy(1), toy(0))], block_filter="weights")
    assert atlas.coefficients(weights).blocks == ["0.weight", "2.weight"]


def test_only_coefficients_get_gradients_and_chain_rule(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, tv_dtype="float32")
    set_coefficients(model, lambda i, b, c: torch.full_like(c, 0.2 * (i + 1)))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(x), y).backward()
    trainable = dict(model.named_trainable_parameters())
    assert all(".coef_" in n for n in trainable) and len(trainable) == 4
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(not b.requires_grad for b in model.buffers())
    # dL/dλ_i^(j) = <dL/dθ^(j), τ_i^(j)> with θ the composed weights
    composed = compose_by_hand(base, tvs, lambda i, n: 0.2 * (i + 1)).requires_grad_(True)
    F.cross_entropy(composed(x), y).backward()
    grads = dict(composed.named_parameters())
    for layer in model.adapted_layers():
        adapter = layer.adapters["default"]
        for attr in adapter.block_attrs:
            name = f"{adapter.layer_name}.{attr}"
            expected = torch.stack([(grads[name].grad * tv[name]).sum() for tv in tvs])
            torch.testing.assert_close(adapter.coefficient(attr).grad, expected, rtol=1e-5, atol=1e-7)


def test_matching_is_by_name_not_position(setup):
    base, tvs = setup
    shuffled = [dict(reversed(list(tv.items()))) for tv in tvs]
    a = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, tv_dtype="float32")
    b = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=shuffled, tv_dtype="float32")
    set_coefficients(a, lambda i, n, c: torch.full_like(c, 0.5))
    set_coefficients(b, lambda i, n, c: torch.full_like(c, 0.5))
    x = torch.randn(3, 4)
    assert torch.equal(a(x), b(x))


def test_bad_task_vectors_are_named_and_leave_model_untouched(setup):
    base, tvs = setup
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    foreign = task_vectors.task_vector(other, copy.deepcopy(other))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"not parameters of this model: \['3.bias', '3.weight'\]"):
        ll.wrap(model, "atlas", task_vectors=[tvs[0], foreign])
    assert all(p.requires_grad for p in model.parameters()) and isinstance(model[0], nn.Linear)
    bad_shape = dict(tvs[0], **{"2.weight": torch.zeros(3, 9)})
    with pytest.raises(ValueError, match=r"2.weight: task vector \(3, 9\) vs model \(3, 8\)"):
        ll.wrap(copy.deepcopy(base), "atlas", task_vectors=[bad_shape])
    with pytest.raises(ValueError, match="partitions"):
        ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, granularity="partition", partitions=0)
    with pytest.raises(ValueError, match="exclude names"):
        ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, exclude=["nope"])
    with pytest.raises(ValueError, match="single task vector"):
        ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs[0])

    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * self.scale

    owner = Owner()
    with pytest.raises(ValueError, match=r"container modules \['scale'\]"):
        ll.wrap(owner, "atlas", task_vectors=[{"scale": torch.ones(3), "fc.weight": torch.ones(3, 4)}])


def test_exclude_drops_a_named_vector(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors={"a": tvs[0], "b": tvs[1]}, exclude=["a"])
    assert model.configs["default"].task_vector_names == ["b"]
    assert sum(p.numel() for p in model.trainable_parameters()) == 4


def test_task_vectors_stored_in_reduced_precision(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs)
    assert model.base_model[0].adapters["default"].get_buffer("tau_weight").dtype == torch.float16
    assert model.base_model[0].adapters["default"].coef_weight.dtype == torch.float32


def test_save_load_embedded_referenced_and_missing(setup, tmp_path):
    base, tvs = setup
    x = torch.randn(5, 4)
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs)
    set_coefficients(model, lambda i, b, c: torch.full_like(c, 0.3 * (i + 1)))
    model.save_pretrained(tmp_path / "embedded")
    assert torch.equal(ll.load(copy.deepcopy(base), tmp_path / "embedded")(x), model(x))
    # referenced: task vectors given as files are not copied into the checkpoint
    paths = []
    for i, tv in enumerate(tvs):
        task_vectors.save_task_vector(tv, tmp_path / f"tv{i}.safetensors")
        paths.append(tmp_path / f"tv{i}.safetensors")
    ref = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=paths)
    set_coefficients(ref, lambda i, b, c: torch.full_like(c, 0.3 * (i + 1)))
    ref.save_pretrained(tmp_path / "ref")
    assert not any(k.startswith("0.tau") or ".tau_" in k for k in ref.adapter_state_dict())
    torch.testing.assert_close(ll.load(copy.deepcopy(base), tmp_path / "ref")(x), model(x), rtol=0, atol=0)
    # λ only: ll.load refuses, load_atlas with the vectors works
    lean = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=tvs, save_task_vectors=False, granularity="global")
    with torch.no_grad():
        next(lean.trainable_parameters()).copy_(torch.tensor([0.1, 0.2, 0.3]))
    lean.save_pretrained(tmp_path / "lean")
    with pytest.raises(ValueError, match="load_atlas"):
        ll.load(copy.deepcopy(base), tmp_path / "lean")
    back = atlas.load_atlas(copy.deepcopy(base), tmp_path / "lean", task_vectors=tvs)
    assert torch.equal(back(x), lean(x))
    assert len({id(layer.adapters["default"].coef) for layer in back.adapted_layers()}) == 1  # λ tied again


def test_task_vector_from_adapter_reproduces_the_adapter(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    bone = ll.wrap(copy.deepcopy(base), "bone", r=2, target_modules=["0"])
    with torch.no_grad():
        for p in bone.trainable_parameters():
            p.normal_(0, 0.1)
    x = torch.randn(5, 8)
    tv = task_vectors.task_vector_from_adapter(bone)
    assert set(tv) == {"0.weight"}
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors=[tv], tv_dtype="float32")
    set_coefficients(model, lambda i, b, c: torch.ones_like(c))
    torch.testing.assert_close(model(x), bone(x), rtol=0, atol=1e-6)
    # from a safetensors checkpoint of the fine-tuned weights
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bone.merge_and_unload().state_dict().items()}, str(tmp_path / "ft.safetensors"))
    from_file = task_vectors.task_vector(tmp_path / "ft.safetensors", base)
    torch.testing.assert_close(from_file["0.weight"], tv["0.weight"], rtol=0, atol=1e-7)
    assert float(from_file["2.weight"].abs().max()) == 0.0


def test_coefficient_table_and_objectives(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors={"a": tvs[0], "b": tvs[1]})
    set_coefficients(model, lambda i, b, c: torch.full_like(c, i + 0.5))
    table = atlas.coefficients(model)
    assert table.values.shape == (2, 4) and table.task_vectors == ["a", "b"]
    assert torch.equal(table.values, torch.tensor([[0.5] * 4, [1.5] * 4]))
    assert "| b | 1.5000 |" in str(table)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    other, other_labels = torch.randn(4, 3), torch.tensor([2, 2, 1, 0])
    torch.testing.assert_close(atlas_objectives.addition_loss([(logits, labels), (other, other_labels)]),
                               F.cross_entropy(logits, labels) + F.cross_entropy(other, other_labels))
    torch.testing.assert_close(atlas_objectives.negation_loss(logits, labels, other, other_labels),
                               F.cross_entropy(other, other_labels) - F.cross_entropy(logits, labels))


def test_blockwise_gradient_selection_picks_largest_gradients(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "atlas", task_vectors={"a": tvs[0], "b": tvs[1], "c": tvs[2]})
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(x), y).backward()
    chosen = atlas.blockwise_gradient_selection(model, budget=2)
    for layer in model.adapted_layers():
        adapter = layer.adapters["default"]
        for attr in adapter.block_attrs:
            g = adapter.coefficient(attr).grad.abs().tolist()
            ranked = sorted(range(3), key=lambda i: -g[i])[:2]
            assert chosen[f"{adapter.layer_name}.{attr}"] == [["a", "b", "c"][i] for i in ranked]


def test_atlas_beside_another_adapter_on_the_same_layer(setup):
    base, tvs = setup
    model = ll.wrap(copy.deepcopy(base), "bone", r=2, target_modules=["0"])
    model.add_adapter("tv", "atlas", task_vectors=tvs, tv_dtype="float32", target_modules=["0"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.normal_(0, 0.2)
    x, layer = torch.randn(5, 4), model.base_model[0]
    with torch.no_grad():
        model.set_adapter("default")
        bone_only = layer(x)
        model.set_adapter("tv")
        atlas_only = layer(x)
        model.set_adapter(["default", "tv"])
        both = layer(x)
        plain = base[0](x)
    # both are additive on a Linear: composed output = base + bone's term + atlas's term
    torch.testing.assert_close(both, bone_only + atlas_only - plain, rtol=0, atol=1e-5)
    assert not torch.allclose(both, bone_only, atol=1e-3) and not torch.allclose(both, atlas_only, atol=1e-3)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("source", ["state_dict", "named_parameters", "embedding_only"])
@pytest.mark.parametrize("granularity", ["block", "partition"])
def test_tied_weights_compose_once_so_merged_equals_unmerged(source: str, granularity: str, tmp_path) -> None:
    """GPT-2 ties lm_head.weight to transformer.wte.weight: both modules must see one composed
    tensor (one λ), and the merge must write it once."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    g = torch.Generator().manual_seed(1)
    entries = dict(model.state_dict() if source == "state_dict" else model.named_parameters())
    keep = ["transformer.wte.weight"] if source == "embedding_only" else [k for k in entries if "attn.bias" not in k]
    tv = {k: 0.1 * torch.randn(entries[k].shape, generator=g) for k in keep}
    if source == "state_dict":
        tv["lm_head.weight"] = tv["transformer.wte.weight"]
    options = {"partitions": 3} if granularity == "partition" else {}
    m = ll.wrap(copy.deepcopy(model), "atlas", task_vectors=[tv], granularity=granularity, **options)
    assert m.configs["default"].tied_blocks == {"transformer.wte.weight": "lm_head.weight"}
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.5 + torch.rand(p.shape, generator=g))
    ids = torch.randint(0, 64, (2, 6), generator=g)
    live = m(input_ids=ids).logits.detach()
    m.save_pretrained(tmp_path)
    m.merge()
    torch.testing.assert_close(m(input_ids=ids).logits, live, rtol=0, atol=1e-5)
    m.unmerge()
    reloaded = ll.load(copy.deepcopy(model), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, live, rtol=0, atol=1e-5)
    reloaded.merge()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, live, rtol=0, atol=1e-5)


def test_tied_entries_that_differ_are_refused() -> None:
    model = tiny_gpt2()
    tv = {"transformer.wte.weight": torch.ones_like(model.transformer.wte.weight), "lm_head.weight": torch.zeros_like(model.lm_head.weight)}
    with pytest.raises(ValueError, match="tied parameters"):
        ll.wrap(model, "atlas", task_vectors=[tv])


def test_config_check_reads_no_file(setup, tmp_path):
    """Making (and validating) the config only checks the option's form; the files are read when
    the adapter is prepared, which is where a missing one is reported."""
    base, tvs = setup
    missing = tmp_path / "absent.safetensors"
    config = ll.adapters.get_method("atlas").config_cls(task_vectors=[tvs[0], missing])
    config.validate()
    assert config.task_vector_names == [] and config.save_task_vectors is None
    assert config.task_vectors[1] == missing
    with pytest.raises(FileNotFoundError, match="no task vector file"):
        ll.wrap(copy.deepcopy(base), config)
    with pytest.raises(ValueError, match="single task vector"):
        ll.adapters.get_method("atlas").config_cls(task_vectors=tvs[0])
    with pytest.raises(ValueError, match="exclude names"):
        ll.adapters.get_method("atlas").config_cls(task_vectors=tvs, exclude=["nope"])
