"""Task inference for per-task adapters: the nearest-prototype router and confidence routing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MLP
from safetensors.torch import load_file, save_file

from lifelong.adapters.routing import PrototypeRouter, TaskRoutedModel, confidence_route


def two_task_router() -> PrototypeRouter:
    router = PrototypeRouter()
    router.update(0, torch.tensor([[1.0, 0.0], [3.0, 0.0]]))  # prototype (2, 0)
    router.update(1, torch.tensor([[0.0, 2.0]]))  # prototype (0, 2)
    return router


def test_hand_worked_prototypes_and_routes() -> None:
    router = two_task_router()
    assert router.tasks == [0, 1] and router.width == 2
    assert torch.equal(router.prototypes, torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    rows = torch.tensor([[1.0, 0.5], [0.2, 1.0], [-1.0, -3.0], [0.0, 0.0]])
    # cosines with (1,0) / (0,1): 0.89/0.45, 0.20/0.98, -0.32/-0.95, tie at 0 -> the first task
    assert torch.equal(router.route(rows), torch.tensor([0, 1, 0, 0]))
    assert router.route(rows).dtype == torch.long


def test_similarity_is_cosine_not_euclidean() -> None:
    router = PrototypeRouter()
    router.update(4, torch.tensor([[10.0, 0.0]]))
    router.update(9, torch.tensor([[0.0, 1.0]]))
    x = torch.tensor([[1.0, 0.5]])  # Euclidean: 9.01 from task 4, 1.12 from task 9; cosine: 0.89 vs 0.45
    assert router.route(x).tolist() == [4]  # the task ids themselves, not their positions


def test_streamed_means_equal_the_float64_mean_of_all_rows() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [1e4 + torch.randn(n, 6, generator=g) for n in (3, 50, 1)]  # large offset: float32 sums round
    router = PrototypeRouter()
    for b in batches:
        router.update(2, b)
    expected = torch.cat(batches).double().mean(dim=0)
    assert float((router.prototypes[0] - expected).abs().max()) < 1e-9
    assert router.state_dict()["counts"].tolist() == [54]


def test_two_separated_clusters_route_correctly() -> None:
    """Clusters that share a large common direction (as transformer features do) and differ in a
    smaller task-specific one; noise per coordinate as large as the task signal."""
    g = torch.Generator().manual_seed(1)
    d = 64
    shared = 4.0 * torch.randn(d, generator=g)
    centers = [shared + torch.randn(d, generator=g) for _ in range(2)]
    router = PrototypeRouter()
    for t, c in enumerate(centers):
        for _ in range(4):  # streamed training batches
            router.update(t, c + 0.5 * torch.randn(50, d, generator=g))
    test = torch.cat([c + 0.5 * torch.randn(500, d, generator=g) for c in centers])
    truth = torch.arange(2).repeat_interleave(500)
    accuracy = float((router.route(test) == truth).double().mean())
    assert accuracy >= 0.99, accuracy


def test_routes_feed_the_task_routed_model() -> None:
    """``route`` gives per-sample task ids that ``TaskRoutedModel.forward(task_id=...)`` accepts."""
    torch.manual_seed(0)
    model = TaskRoutedModel(MLP(), "lora", r=2, target_modules=["fc1", "fc2"])
    model.add_task(0)
    model.add_task(1)
    with torch.no_grad():  # B off zero, so each task's adapter changes the output its own way
        for layer in model.adapted_layers():
            for adapter in layer.adapters.values():
                adapter.lora_B.normal_()
    router = PrototypeRouter()
    router.update(0, torch.randn(20, 16) + 3.0)
    router.update(1, torch.randn(20, 16) - 3.0)
    x = torch.cat([torch.randn(3, 16) + 3.0, torch.randn(3, 16) - 3.0])
    routes = router.route(x)
    assert routes.tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        routed = model(x, task_id=routes)
        by_oracle = torch.cat([model(x[:3], task_id=0), model(x[3:], task_id=1)])
        assert torch.equal(routed, by_oracle)
        assert not torch.allclose(model(x, task_id=0), model(x, task_id=1))


def test_state_round_trip_through_safetensors(tmp_path) -> None:
    router = two_task_router()
    router.update(7, torch.tensor([[-1.0, -1.0], [-3.0, -1.0]]))
    state = router.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(state, str(tmp_path / "router.safetensors"))
    again = PrototypeRouter()
    again.load_state_dict(load_file(str(tmp_path / "router.safetensors")))
    assert again.tasks == [0, 1, 7] and torch.equal(again.prototypes, router.prototypes)
    probe = torch.randn(40, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.route(probe), router.route(probe))
    router.update(0, torch.tensor([[0.0, 100.0]]))  # the loaded copy does not share tensors
    assert torch.equal(again.prototypes[0], torch.tensor([2.0, 0.0], dtype=torch.float64))
    empty = PrototypeRouter()
    empty.load_state_dict(PrototypeRouter().state_dict())
    assert empty.tasks == []


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda r: PrototypeRouter().route(torch.ones(2, 2)), RuntimeError, r"route\(\) before any task"),
    (lambda r: PrototypeRouter().prototypes, RuntimeError, "has no task yet"),
    (lambda r: r.route(torch.ones(2, 3)), ValueError, "features have width 3, the prototypes 2"),
    (lambda r: r.update(0, torch.ones(2, 5)), ValueError, "features have width 5, the prototypes 2"),
    (lambda r: r.route(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])), ValueError, "non-finite values .first in row 1."),
    (lambda r: r.update(1, torch.tensor([[math.inf, 0.0]])), ValueError, "non-finite values"),
    (lambda r: r.route(torch.ones(2)), ValueError, r"must be a \(N, D\) tensor with N >= 1, got \(2,\)"),
    (lambda r: r.update(0, torch.ones(0, 2)), ValueError, r"must be a \(N, D\) tensor with N >= 1"),
    (lambda r: r.update(True, torch.ones(1, 2)), TypeError, "task ids are ints, got True"),
    (lambda r: r.update("a", torch.ones(1, 2)), TypeError, "task ids are ints, got 'a'"),
    (lambda r: r.load_state_dict({"sums": torch.ones(1, 2)}), ValueError, "must have the keys"),
    (lambda r: r.load_state_dict({**r.state_dict(), "counts": torch.tensor([1, 0])}), ValueError, "no samples"),
    (lambda r: r.load_state_dict({**r.state_dict(), "task_ids": torch.tensor([1, 1])}), ValueError, "inconsistent"),
])
def test_bad_input_is_refused_with_a_clear_error(call, error, message) -> None:
    router = two_task_router()
    before = router.state_dict()
    with pytest.raises(error, match=message):
        call(router)
    after = router.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a refused call changes nothing


def test_confidence_route_hand_worked() -> None:
    task0 = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # max softmax: 0.881, 0.5, 0.5
    task1 = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 0.576, 0.909, 0.333
    assert confidence_route([task0, task1]).tolist() == [0, 1, 0]
    padded = torch.tensor([[5.0, -math.inf], [0.0, -math.inf], [0.0, 0.0]])  # 1.0 (only class), 1.0, 0.5
    assert confidence_route([task0, padded]).tolist() == [1, 1, 0]  # row 2 ties 0.5 = 0.5 -> task 0
    assert confidence_route([task0, task0.clone(), task0 + 0.0]).tolist() == [0, 0, 0]
    assert confidence_route([task1, padded]).dtype == torch.long


@pytest.mark.parametrize(("logits", "message"), [
    ([], "non-empty list"),
    ([torch.ones(3)], r"task 0's logits must be \(N, C\)"),
    ([torch.ones(3, 2), torch.ones(2, 2)], "task 1 has 2 rows, task 0 has 3"),
    ([torch.ones(1, 2), torch.tensor([[float("nan"), 0.0]])], "task 1's logits hold NaN"),
    ([torch.tensor([[-math.inf, -math.inf]])], "a row with no finite value"),
])
def test_confidence_route_errors(logits, message) -> None:
    with pytest.raises(ValueError, match=message):
        confidence_route(logits)
