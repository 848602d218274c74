"""The continual core: one hook protocol on every engine, the method registry, native EWC/LwF against
Avalanche's, LaMDA's schedule under run_stream, result.model round trips, no import cycles."""

import ast
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lifelong.continual as lc
from trainer_doubles import DictData, TinyNet
from lifelong.continual import Context, ContinualMethod, MethodConfig, register_method

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message="No loggers specified")


@pytest.fixture(scope="module")
def split3():
    return lc.split_digits(3, test_size=0.3, seed=0)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# ---- a method defined outside the library: one class, one decorator ---------------------------------
CALLS: list = []


@dataclass
class ShrinkConfig(MethodConfig):
    weight: float = 0.1


@register_method("test_shrink", adapter_modes=("none", "shared"))
class Shrink(ContinualMethod):
    """L2 towards zero through the loss hook; records every hook call."""

    Config = ShrinkConfig

    def before_experience(self, ctx: Context) -> None:
        CALLS.append(("before_experience", ctx.experience, ctx.optimizer is None))

    def loss(self, ctx: Context, loss: torch.Tensor) -> torch.Tensor:
        CALLS.append(("loss", ctx.experience, tuple(ctx.logits.shape)))
        return loss + self.weight * sum(p.square().sum() for p in ctx.model.parameters() if p.requires_grad)

    def after_backward(self, ctx: Context) -> None:
        CALLS.append(("after_backward", ctx.experience, None))

    def after_step(self, ctx: Context) -> None:
        CALLS.append(("after_step", ctx.experience, ctx.step))

    def after_experience(self, ctx: Context) -> None:
        CALLS.append(("after_experience", ctx.experience, ctx.total_steps))


def _order(calls) -> list[str]:
    """Hook names with consecutive repeats collapsed."""
    out = []
    for name, *_ in calls:
        if not out or out[-1] != name:
            out.append(name)
    return out


@pytest.mark.parametrize("engine", ["native", "avalanche", "trainer"])
def test_a_registered_toy_method_runs_by_name_on_every_engine(engine, split3):
    assert "test_shrink" in lc.available_methods()
    CALLS.clear()
    res = lc.run_stream(_mlp(), split3, "test_shrink", method_options={"weight": 0.5}, engine=engine,
                        batch_size=128, progress=False)
    assert res.method == "test_shrink" and res.engine == engine
    first = [c for c in CALLS if c[1] == 0]
    steps = [c for c in first if c[0] == "after_step"]
    assert len(steps) == first[-1][2] > 1  # total_steps as announced
    assert _order(first) == ["before_experience", *["loss", "after_backward", "after_step"] * len(steps),
                             "after_experience"]
    assert [c[2] for c in steps] == list(range(1, len(steps) + 1))
    assert sum(c[0] == "after_experience" for c in CALLS) == 3
    assert all(c[2] == (32, 10) or c[2][1] == 10 for c in CALLS if c[0] == "loss")
    # the loss hook acted: a strong shrink leaves smaller weights than naive
    base = lc.run_stream(_mlp(), split3, "naive", engine=engine, batch_size=128, progress=False)
    shrunk = sum(p.square().sum() for p in res.model.module.parameters())
    plain = sum(p.square().sum() for p in base.model.module.parameters())
    assert shrunk < 0.9 * plain


def test_methods_combine_in_order_and_errors_name_method_and_hook(split3):
    CALLS.clear()
    res = lc.run_stream(_mlp(), split3, ["test_shrink", "migu"], progress=False, batch_size=256)
    assert res.method == "test_shrink+migu"

    class Boom(ContinualMethod):
        name = "boom"

        def after_backward(self, ctx):
            raise ValueError("exploded")

    with pytest.raises(ValueError, match="method 'boom' raised in its after_backward hook: ValueError: exploded"):
        lc.run_stream(_mlp(), split3, [Boom(), "naive"], progress=False)
    with pytest.raises(lc.HookError):
        lc.run_stream(_mlp(), split3, Boom(), progress=False)


def test_registry_bad_input(split3):
    with pytest.raises(ValueError, match="unknown continual method 'nope'; valid: .*ewc.*lwf.*naive"):
        lc.run_stream(_mlp(), split3, "nope", progress=False)
    with pytest.raises(ValueError, match="'test_shrink' does not run with adapter mode 'per_task'; it supports "
                                         "adapter modes: none, shared"):
        lc.run_stream(_mlp(), split3, "test_shrink", adapter="bone", adapter_mode="per_task",
                      adapter_options={"r": 4, "target_modules": ["0"]}, progress=False)
    with pytest.raises(ValueError, match="'kcl' does not run with engine 'trainer'"):
        lc.run_stream(_mlp(), split3, "kcl", engine="trainer", progress=False)
    with pytest.raises(ValueError, match="names a method twice"):
        lc.run_stream(_mlp(), split3, ["migu", "migu"], progress=False)
    with pytest.raises(ValueError, match="kcl.*cannot be combined"):
        lc.run_stream(_mlp(), split3, ["kcl", "naive"], progress=False)
    with pytest.raises(ValueError, match="already registered"):
        register_method("migu")(Shrink)
    with pytest.raises(TypeError, match="unknown setting.*'epoch'"):
        lc.run_stream(_mlp(), split3, "naive", epoch=2)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        lc.run_stream(_mlp(), split3, "naive", lr=float("nan"))


# ---- native EWC / LwF against Avalanche's ----------------------------------------------------------------
@pytest.mark.parametrize("method, options", [("ewc", {"ewc_lambda": 50.0}), ("lwf", {"alpha": 1.0, "temperature": 2.0})])
def test_native_ewc_and_lwf_agree_with_avalanche(method, options, split3):
    runs = {engine: lc.run_stream(_mlp(), split3, method, method_options=options, engine=engine, lr=0.05,
                                  batch_size=32, epochs=1, progress=False)
            for engine in ("native", "avalanche", "trainer")}
    naive = lc.run_stream(_mlp(), split3, "naive", lr=0.05, batch_size=32, progress=False)
    native, theirs = np.asarray(runs["native"].accuracy_matrix), np.asarray(runs["avalanche"].accuracy_matrix)
    # same batches in the same order, same formula: equal to float rounding (stated tolerance: 0.5 % points)
    np.testing.assert_allclose(native, theirs, atol=0.005)
    np.testing.assert_allclose(native, np.asarray(runs["trainer"].accuracy_matrix), atol=0.005)
    assert not np.allclose(native, np.asarray(naive.accuracy_matrix))  # the regulariser changed the run
    for p, q in zip(runs["native"].model.module.parameters(), runs["avalanche"].model.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_ewc_penalty_is_a_hand_computation():
    ewc = lc.EWC(ewc_lambda=2.0)
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 3.0]]))
    ewc.anchors = [{"weight": torch.tensor([[0.0, 1.0]])}]
    ewc.fishers = [{"weight": torch.tensor([[0.5, 2.0]])}]
    ctx = Context(model=model, experience=1, experiences=[])
    # 2 * (0.5 * 1² + 2 * 2²) = 17
    assert float(ewc.loss(ctx, torch.tensor(1.0))) == pytest.approx(18.0)


# ---- an adapter's own schedule under run_stream -------------------------------------------------------------
@pytest.mark.parametrize("engine", ["native", "trainer", "avalanche"])
def test_lamda_columns_freeze_under_run_stream(engine, split3):
    res = lc.run_stream(_mlp(), split3, "naive", adapter="lamda", engine=engine, batch_size=64, lr=0.05,
                        adapter_options={"r": 4, "target_modules": ["0", "2"], "pmb_freeze_fraction": 0.5},
                        progress=False)
    adapters = [m for m in res.model.module.modules() if hasattr(m, "frozen_columns")]
    assert adapters and all(bool(a.frozen_columns.all()) for a in adapters)
    steps = res.train_steps
    assert all(a.config.total_steps == steps for a in adapters)  # the run's real step count
    assert all(not a.lora_B.requires_grad for a in adapters)


# ---- the trained model ------------------------------------------------------------------------------------
def test_result_model_round_trips_on_a_tensor_stream(split3, tmp_path):
    res = lc.run_stream(_mlp(), split3, "naive", adapter="lora", adapter_options={"r": 4, "target_modules": ["0"]},
                        progress=False)
    x = torch.stack([split3.test_stream[2].dataset[i][0] for i in range(20)])
    before = res.model.predict(x)
    res.model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["adapters", "continual_model.json", "head.safetensors"]
    loaded = lc.load_model(_mlp(), tmp_path / "m")  # a fresh copy of the same pretrained base
    assert torch.equal(loaded.predict(x), before)


def _cycles(package: Path, prefix: str) -> list[list[str]]:
    """Cycles among the modules of ``package`` (imports at any depth of a function, relative or absolute)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            continue
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                    target = ".".join(base + ([node.module] if node.module else []))
                    candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                elif node.module and node.module.startswith(prefix + "."):
                    target = node.module[len(prefix) + 1:]
                    candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                else:
                    continue
                deps |= {c for c in candidates if c in modules and c != name}
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_continual_modules_import_without_cycles():
    root = Path(lc.__file__).parent
    assert _cycles(root, "lifelong.continual") == []


# ---- the hooks inside a Trainer of the user's own ------------------------------------------------------------
def _trainer(model, data, callback):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="/tmp/lifelong_cb", per_device_train_batch_size=8, num_train_epochs=1,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def test_continual_callback_rehearses_in_a_users_trainer_and_ends_without_experiences():
    from types import SimpleNamespace

    experiences = [SimpleNamespace(dataset=DictData(40, 0)), SimpleNamespace(dataset=DictData(30, 1))]
    env = lc.PowerLawReplay(ratio=0.5)
    env.remember(40)  # experience 0 was trained before
    callback = lc.ContinualCallback(env, task_index=1, experiences=experiences)
    data = callback.train_dataset(experiences[1].dataset)
    assert len(data) == 30 + 15  # the current data and this phase's rehearsal of experience 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(TinyNet(), data, callback).train()
    assert env.past_sizes == [40, 30]
    with pytest.raises(ValueError, match="callback.train_dataset"):  # a Trainer on the bare data would not rehearse
        _trainer(TinyNet(), experiences[1].dataset, lc.ContinualCallback(lc.PowerLawReplay(ratio=0.5), 1,
                                                                      experiences)).train()
    migu = lc.MIGU(start_task=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(TinyNet(), DictData(16, 2), lc.ContinualCallback(migu)).train()  # experiences=None: ends cleanly
    assert not migu.attached
    with pytest.raises(ValueError, match="add to the loss"):
        lc.ContinualCallback(lc.EWC())


# ---- speed options ------------------------------------------------------------------------------------------
def test_length_buckets_batch_similar_lengths_and_cover_every_sample_once():
    from lifelong.continual.loop import shuffled_loader

    lengths = torch.tensor([3, 9, 1, 7, 5, 2, 8, 4, 6, 10] * 20)
    x = torch.zeros(len(lengths), 2, 12, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        x[i, 1, :n] = 1
    data = torch.utils.data.TensorDataset(x, torch.arange(len(lengths)))
    seen, spreads = [], []
    for xb, idx in shuffled_loader(data, 8, seed=3, buckets=True):
        seen += idx.tolist()
        counts = xb[:, 1].sum(1)
        spreads.append(int(counts.max() - counts.min()))
    assert sorted(seen) == list(range(len(lengths)))  # each sample once per pass
    assert max(spreads) <= 1  # 200 samples in one window: sorted batches of near-equal length
    again = [idx.tolist() for _, idx in shuffled_loader(data, 8, seed=3, buckets=True)]
    assert again == [idx.tolist() for _, idx in shuffled_loader(data, 8, seed=3, buckets=True)]
    with pytest.raises(ValueError, match="packed text samples"):
        shuffled_loader(torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.zeros(4)), 2, 0, buckets=True)


def test_bf16_autocast_runs_and_stays_close_to_fp32(split3):
    fp32 = lc.run_stream(_mlp(), split3, "naive", lr=0.05, progress=False)
    bf16 = lc.run_stream(_mlp(), split3, "naive", lr=0.05, precision="bf16", progress=False)
    assert np.abs(np.asarray(fp32.accuracy_matrix) - np.asarray(bf16.accuracy_matrix)).max() < 0.1
    assert all(p.dtype == torch.float32 for p in bf16.model.module.parameters())
    with pytest.raises(ValueError, match="precision must be one of"):
        lc.run_stream(_mlp(), split3, "naive", precision="fp8")


def test_fsdp_is_refused_where_it_cannot_shard(split3):
    with pytest.raises(ValueError, match="fsdp=True shards a fixed set of tensors"):
        lc.run_stream(_mlp(), split3, "naive", fsdp=True, adapter="lora", adapter_mode="per_task",
                      adapter_options={"r": 4, "target_modules": ["0"]})
    with pytest.raises(ValueError, match="'ewc' does not run on an FSDP-sharded model .*methods that shard: joint, "
                                         "naive, powerlaw, replay"):
        lc.run_stream(_mlp(), split3, "ewc", fsdp=True)
    with pytest.raises(ValueError, match="launch with torchrun"):
        lc.run_stream(_mlp(), split3, "naive", fsdp=True, progress=False)
