"""Avalanche bridges: MIGU plugin, CLASSP state across experiences, power-law plugin, and our metrics
against Avalanche's StreamForgetting / StreamBWT / StreamForwardTransfer on a real run."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lifelong.continual as lc
from lifelong.continual import metrics as M

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def split3():
    return lc.split_digits(3, seed=0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _naive(model, opt, plugins, **kw):
    from avalanche.training.supervised import Naive

    from lifelong.continual.engines.avalanche import silent_evaluator

    return Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=64, train_epochs=1,
                 eval_mb_size=256, plugins=plugins, evaluator=silent_evaluator()
                 if "evaluator" not in kw else kw.pop("evaluator"), **kw)


def test_migu_plugin_masks_from_start_task(split3):
    from avalanche.core import SupervisedPlugin

    rows = []

    class Spy(SupervisedPlugin):
        def after_backward(self, strategy, **kwargs):
            g = strategy.model[0].weight.grad
            rows.append((strategy.experience.current_experience, int((g.abs().sum(1) != 0).sum())))

    model = _mlp()
    strategy = _naive(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      [lc.MIGUPlugin(mask_ratio=0.75, start_task=1), Spy()])
    for exp in list(split3.train_stream)[:2]:
        strategy.train(exp)
    first = [n for e, n in rows if e == 0]
    second = [n for e, n in rows if e == 1]
    assert max(first) > 4  # unmasked during the first experience
    assert max(second) <= 16 - int(0.75 * 16) == 4 and min(second) >= 1


def test_classp_state_survives_experiences(split3):
    model = _mlp()
    opt = lc.CLASSP(model.parameters(), lr=0.05, threshold=0.0)
    strategy = _naive(model, opt, [])
    strategy.train(split3.train_stream[0])
    after_first = {id(p): opt.state[p]["grad_sum"].clone() for p in model.parameters()}
    strategy.train(split3.train_stream[1])
    for p in model.parameters():
        s = opt.state[p]["grad_sum"]
        assert (s >= after_first[id(p)]).all() and (s > after_first[id(p)]).any()  # kept and grown, not reset


def test_powerlaw_plugin_phase_sizes(split3):
    from avalanche.core import SupervisedPlugin

    sizes = []

    class Spy(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            sizes.append(len(strategy.adapted_dataset))

    env = lc.PowerLawReplay(ratio=0.5, alpha=1.0)
    model = _mlp()
    strategy = _naive(model, torch.optim.SGD(model.parameters(), lr=0.1), [lc.PowerLawReplayPlugin(env), Spy()])
    for exp in split3.train_stream:
        strategy.train(exp)
    n = [len(e.dataset) for e in split3.train_stream]
    assert sizes == [n[0], n[1] + n[1] // 2, n[2] + n[2] // 2]
    assert env.past_sizes == n


def test_metrics_agree_with_avalanche(split3):
    from avalanche.evaluation.metrics import (accuracy_metrics, bwt_metrics, forgetting_metrics,
                                              forward_transfer_metrics)
    from avalanche.training.plugins import EvaluationPlugin

    model = _mlp()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), forgetting_metrics(stream=True),
                                 bwt_metrics(stream=True), forward_transfer_metrics(stream=True), loggers=[])
    strategy = _naive(model, torch.optim.SGD(model.parameters(), lr=0.2), [], evaluator=evaluator, eval_every=0)
    r = np.zeros((3, 3))
    b = np.zeros(3)
    for i, exp in enumerate(split3.train_stream):
        strategy.train(exp, eval_streams=[split3.test_stream])
        last = strategy.eval(split3.test_stream)
        for j in range(3):
            r[i, j] = last[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]
    # b: the initial evaluation Avalanche ran before training (eval_every=0)
    history = evaluator.get_all_metrics()
    for j in range(3):
        b[j] = history[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"][1][0]
    assert last["StreamForgetting/eval_phase/test_stream"] == pytest.approx(M.avalanche_forgetting(r), abs=1e-6)
    assert last["StreamBWT/eval_phase/test_stream"] == pytest.approx(M.backward_transfer(r), abs=1e-6)
    assert last["StreamForwardTransfer/eval_phase/test_stream"] == pytest.approx(M.forward_transfer(r, b), abs=1e-6)
    # our per-experience evaluation gives the same accuracies as Avalanche's
    from lifelong.continual.loop import evaluate_stream

    ours = evaluate_stream(lambda x, t, j: model(x), list(split3.test_stream), None, 256, "cpu")
    np.testing.assert_allclose(ours, r[2], atol=1e-6)
