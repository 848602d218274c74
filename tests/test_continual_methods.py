"""The field's standard rows: IncLoRA, O-LoRA, joint, per-task fine-tuning, PEFT factories (OSF),
task-agnostic routing of per-task adapters, TensorBoard logging."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset

import lifelong
import lifelong.continual as lc
from conftest import _MINILM, minilm
from lifelong.continual import Context, ContinualMethod, register_method
from lifelong.continual.adapter_modes import subspace_overlap
from lifelong.continual.loop import Experience, experience_seed, shuffled_loader
from lifelong.continual.methods.olora import olora_penalty

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)

TARGETS = {"r": 4, "target_modules": ["0", "2"]}


@pytest.fixture(scope="module")
def split3():
    return lc.split_digits(3, test_size=0.3, seed=0)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


SNAPSHOTS: dict = {}


@register_method("test_snapshot", adapter_modes=("incremental",))
class Snapshot(ContinualMethod):
    """Keeps a copy of every incremental adapter's tensors at the end of each experience."""

    def after_experience(self, ctx: Context) -> None:
        SNAPSHOTS[ctx.experience] = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if "exp_" in n}


# ---- IncLoRA and O-LoRA ----------------------------------------------------------------------------------------
def test_inclora_keeps_earlier_adapters_bit_identical_and_all_active(split3):
    SNAPSHOTS.clear()
    res = lc.run_stream(_mlp(), split3, "test_snapshot", adapter="lora", adapter_mode="incremental",
                        adapter_options=TARGETS, lr=0.1, batch_size=64, progress=False)
    assert sorted(SNAPSHOTS) == [0, 1, 2]
    for t in (1, 2):  # what experience t-1 left is untouched by experience t's training
        for name, value in SNAPSHOTS[t - 1].items():
            assert torch.equal(SNAPSHOTS[t][name], value), name
    adapted = res.model.module.backbone
    assert adapted.active_adapters == ["exp_0", "exp_1", "exp_2"]
    assert any("exp_2" in n for n, p in adapted.named_parameters() if p.requires_grad)
    assert not any(("exp_0" in n or "exp_1" in n) for n, p in adapted.named_parameters() if p.requires_grad)
    stored = sum(p.numel() for n, p in adapted.named_parameters() if "exp_" in n)
    assert res.memory["stored_adapter_floats"] == stored > 0  # every experience's adapter is kept
    overlap = res.metrics["subspace_overlap"]
    assert overlap == pytest.approx(subspace_overlap(res.model.module, "exp_2")) and 0 < overlap < 2


def test_olora_penalty_is_a_hand_computation():
    model = lifelong.wrap(nn.Sequential(nn.Linear(4, 3)), "lora", r=2, target_modules=["0"])
    adapted = model
    adapted.add_adapter("exp_0", "lora", r=2, target_modules=["0"])
    adapted.add_adapter("exp_1", "lora", r=2, target_modules=["0"])
    layer = adapted.base_model[0]
    a0 = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 1.0]])
    a1 = torch.tensor([[0.5, 1.0, 0.0, -1.0], [2.0, 0.0, 1.0, 0.0]])
    b1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]])
    with torch.no_grad():
        layer.adapters["exp_0"].lora_A.copy_(a0)
        layer.adapters["exp_1"].lora_A.copy_(a1)
        layer.adapters["exp_1"].lora_B.copy_(b1)
    # A0 A1ᵀ = [[0.5, 4], [-2, 0]] → Σ|·| = 6.5; ‖A1‖ = √(0.25+1+1+4+1) = √7.25; ‖B1‖ = √10
    expected = 0.5 * 6.5 + 0.1 * (7.25 ** 0.5 + 10 ** 0.5)
    assert float(olora_penalty(adapted, "exp_1", 0.5, 0.1)) == pytest.approx(expected)
    assert float(olora_penalty(adapted, "exp_0", 0.5, 0.0)) == 0.0  # nothing earlier to be orthogonal to
    # subspace overlap: ‖A0 A1ᵀ‖²_F / (‖A0‖²_F ‖A1‖²_F) = 20.25 / (7 · 7.25)
    assert subspace_overlap(adapted, "exp_1") == pytest.approx(20.25 / (7 * 7.25))


def test_olora_lowers_the_overlap_and_combines_with_migu(split3):
    common = dict(adapter="lora", adapter_mode="incremental", adapter_options=TARGETS, lr=0.1, batch_size=64,
                  progress=False)
    inclora = lc.run_stream(_mlp(), split3, "naive", **common)
    olora = lc.run_stream(_mlp(), split3, "olora", **common)  # the authors' default λ1 = 0.5
    assert olora.metrics["subspace_overlap"] < 0.2 * inclora.metrics["subspace_overlap"]
    both = lc.run_stream(_mlp(), split3, ["migu", "olora"], **common)
    assert both.method == "migu+olora" and np.isfinite(both.acc)


def test_standard_rows_bad_input(split3):
    with pytest.raises(ValueError, match="'olora' does not run with adapter mode 'shared'; it supports adapter "
                                         "modes: incremental"):
        lc.run_stream(_mlp(), split3, "olora", adapter="lora", adapter_options=TARGETS, progress=False)
    with pytest.raises(ValueError, match="incremental' needs a LoRA-shaped adapter .*got 'bone'"):
        lc.run_stream(_mlp(), split3, "naive", adapter="bone", adapter_mode="incremental",
                      adapter_options={"r": 4, "target_modules": ["0"]}, progress=False)
    with pytest.raises(ValueError, match="returned Sequential with no trainable parameter"):
        lc.run_stream(_mlp(), split3, "naive", adapter=lambda model, t: model.requires_grad_(False),
                      adapter_mode="sequential", progress=False)
    with pytest.raises(ValueError, match="task_inference='prototype' .* needs adapter_mode='per_task'"):
        lc.run_stream(_mlp(), split3, "naive", adapter="lora", adapter_options=TARGETS, task_inference="prototype",
                      progress=False)
    with pytest.raises(ValueError, match="olora: lambda1 must be a finite number >= 0"):
        lc.run_stream(_mlp(), split3, "olora", method_options={"lambda1": -1.0}, adapter="lora",
                      adapter_mode="incremental", adapter_options=TARGETS, progress=False)


# ---- joint and per-task fine-tuning --------------------------------------------------------------------------
def test_joint_equals_training_once_on_the_concatenated_data(split3):
    res = lc.run_stream(_mlp(), split3, "joint", lr=0.05, batch_size=32, epochs=2, progress=False)
    model = _mlp()
    union = ConcatDataset([Experience(e, i).dataset for i, e in enumerate(split3.train_stream)])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = shuffled_loader(union, 32, experience_seed(0, 0))
    for _ in range(2):
        for x, y, *_ in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(res.model.module.backbone.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    r = np.asarray(res.accuracy_matrix)
    assert (r == r[-1]).all() and res.forgetting == 0.0  # one model, evaluated after every experience
    assert res.train_steps == 2 * -(-len(union) // 32)


def test_per_task_finetuning_never_forgets_and_predicts_each_task_with_its_weights(split3, tmp_path):
    res = lc.run_stream(_mlp(), split3, "per_task_finetune", lr=0.1, batch_size=32, epochs=3, progress=False)
    r = np.asarray(res.accuracy_matrix)
    for j in range(3):
        assert (r[j:, j] == r[j, j]).all() and r[j, j] > 0.8
    naive = lc.run_stream(_mlp(), split3, "naive", lr=0.1, batch_size=32, epochs=3, progress=False)
    assert res.acc > naive.acc + 0.3  # naive forgets in class-incremental digits
    assert res.memory["stored_floats"] == 3 * sum(p.numel() for p in _mlp().parameters())


# ---- any PEFT method as a sequential adapter -----------------------------------------------------------------
def _text_stream(task_incremental: bool = True) -> lc.TextStream:
    reviews = ["a wonderful film", "great acting and a fine story", "I loved every minute", "superb and moving",
               "a dull film", "terrible acting and a weak story", "I hated every minute", "boring and empty"]
    news = ["the team won the cup final", "a late goal decided the match", "the striker scored twice",
            "the coach praised the keeper", "the minister met leaders abroad", "elections were held in the capital",
            "the summit ended in talks", "parliament passed the budget"]
    return lc.text_stream([
        (reviews, ["Good"] * 4 + ["Bad"] * 4, reviews[::2], ["Good"] * 2 + ["Bad"] * 2),
        (news, ["Sports"] * 4 + ["World"] * 4, news[::2], ["Sports"] * 2 + ["World"] * 2),
    ], names=["reviews", "news"], task_incremental=task_incremental)


def _tok():
    minilm()
    return _MINILM["tokenizer"]


def test_peft_osf_factory_runs_as_a_sequential_row():
    stream = _text_stream()
    factory = lc.osf_factory(["query", "value"], num_tasks=2)
    res = lc.run_stream(minilm(), stream, "naive", tokenizer=_tok(), adapter=factory, adapter_mode="sequential",
                        max_length=16, batch_size=4, lr=1e-3, optimizer="adam", progress=False)
    r = np.asarray(res.accuracy_matrix)
    assert r.shape == (2, 2) and np.isfinite(r[1]).all()
    assert 0 < res.trainable_parameters < sum(p.numel() for p in minilm().parameters())
    assert res.config["adapter"].startswith("osf_factory(2 tasks")


# ---- routing per-task adapters by content --------------------------------------------------------------------
def test_prototype_routing_between_two_clearly_different_tasks(tmp_path):
    stream = _text_stream(task_incremental=False)
    res = lc.run_stream(minilm(), stream, "naive", tokenizer=_tok(), adapter="lora", adapter_mode="per_task",
                        adapter_options={"r": 4}, task_inference="prototype", max_length=16, batch_size=4,
                        lr=1e-3, optimizer="adam", epochs=2, progress=False)
    assert res.metrics["task_inference_accuracy"] >= 0.9
    texts = ["the keeper saved a penalty", "a moving and superb film"]
    routed = res.model.predict(texts)  # no task given: routed by content
    res.model.save_pretrained(tmp_path / "m")
    loaded = lc.load_model(minilm(), tmp_path / "m")
    assert torch.equal(loaded.predict(texts), routed)
    assert torch.equal(loaded.router.route(loaded.encode(texts)), torch.tensor([1, 0]))


def test_tensorboard_logs_each_experience(split3, tmp_path):
    lc.run_stream(_mlp(), split3, "naive", tensorboard=str(tmp_path / "tb"), progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("accuracy/average_seen")]
    assert steps == [0, 1, 2]
    assert {"accuracy/0", "accuracy/1", "accuracy/2"} <= set(events.Tags()["scalars"])
