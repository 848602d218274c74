"""Flower bridge logic without Ray: a DirectGrid calls the ClientApp in process."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import lifelong.federated as fl

flower = pytest.importorskip("lifelong.federated.flower", reason="needs the lifelong[federated] extra")
from flwr.app import Error, Message, MetricRecord, RecordDict  # noqa: E402
from flower_doubles import DirectGrid, PartitionedData  # noqa: E402

d = load_digits()
X = torch.tensor(d.data / 16.0, dtype=torch.float32)
Y = torch.tensor(d.target)
NODES = 4


def model_fn():
    torch.manual_seed(0)
    return nn.Linear(64, 10)


def data_fn(partition, num_partitions):
    idx = np.arange(partition, 400, num_partitions)
    return X[idx], Y[idx]


def test_importing_lifelong_federated_does_not_import_flwr():
    code = "import sys, lifelong.federated; assert 'flwr' not in sys.modules, 'flwr imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_round_based_strategy_matches_a_direct_replay():
    worker = flower.FlowerWorker(model_fn, data_fn, seed=7)
    grid = DirectGrid(flower.make_client_app(worker), NODES)
    lr, eta = 0.1, 2.0
    strategy = flower.AFAStrategy(fl.AFACD(local_lr=lr, server_lr=eta, buffer_size=NODES),
                                  num_workers=NODES, max_local_steps=3, seed=7)
    result = strategy.start(grid, flower.params_to_record(fl.trainable_params(model_fn())),
                            num_rounds=3)
    # replay with the core library only: same keys, same K rule, same seeds
    x = fl.trainable_params(model_fn())
    for version in range(3):
        gs = []
        for p in range(NODES):
            key = [7, p, version, version]        # every node's job counter = round index here
            k = int(np.random.default_rng([42, *key]).integers(1, 4))
            trainer = fl.LocalTrainer(model_fn(), *data_fn(p, NODES))
            seed = int(np.random.SeedSequence(key).generate_state(1)[0])
            g, _ = trainer.run(x, np.arange(len(trainer.labels)), k, lr, seed)
            gs.append(g)
        x = {n: x[n] - eta * lr * torch.stack([g[n] for g in gs]).mean(0) for n in x}
    final = flower.record_to_params(result.arrays)
    for n in x:
        assert torch.allclose(final[n], x[n], atol=1e-6)
    metrics = result.train_metrics_clientapp
    assert [metrics[r]["model-version"] for r in (1, 2, 3)] == [1, 2, 3]
    assert metrics[3]["uplink-bytes"] == 3 * NODES * (64 * 10 + 10) * 4   # only trainable tensors


def test_nodes_that_decline_send_nothing_and_the_model_stays():
    worker = flower.FlowerWorker(model_fn, data_fn, participation=0.0)
    grid = DirectGrid(flower.make_client_app(worker), NODES)
    strategy = flower.AFAStrategy(fl.AFACS(local_lr=0.1), num_workers=NODES)
    messages = strategy.configure_train(1, flower.params_to_record(fl.trainable_params(model_fn())),
                                        None, grid)
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert arrays is None and metrics["updates"] == 0 and strategy.server.version == 0


def test_error_replies_are_skipped():
    flower.ensure_task_identity()
    server = fl.AFACD(local_lr=0.1).init(fl.trainable_params(model_fn()), NODES)
    msg = flower.train_message(server, 2**63 + 5, 2)
    msg.metadata.__dict__["_message_id"] = "m1"
    assert flower.reply_to_update(Message(Error(code=0, reason="node died"), reply_to=msg)) is None
    ok = Message(RecordDict({"update": flower.params_to_record(server.params),
                             "metrics": MetricRecord({"participated": 1, "partition-id": 2,
                                                      "model-version": 0, "local-steps": 3,
                                                      "num-examples": 5})}), reply_to=msg)
    update = flower.reply_to_update(ok)
    assert (update.worker, update.local_steps, update.base_version) == (2, 3, 0)


def test_event_driven_loop_produces_staleness_from_slow_nodes():
    worker = flower.FlowerWorker(model_fn, data_fn, seed=1)
    grid = DirectGrid(flower.make_client_app(worker), NODES, delays={0: 3, 1: 0, 2: 1, 3: 0})
    server = fl.AFACD(local_lr=0.1, server_lr=2.0, buffer_size=2, max_staleness=1)
    server.init(fl.trainable_params(model_fn()), NODES)
    accuracy = []

    def evaluate(step, params):
        trainer = fl.LocalTrainer(model_fn(), X, Y)
        accuracy.append(trainer.evaluate(params, X[1500:], Y[1500:])[0])
        return accuracy[-1]

    out = flower.run_async(grid, server, num_steps=12, concurrency=3, max_local_steps=3,
                           poll_interval=0.0, evaluate_fn=evaluate, eval_every=4)
    assert out["steps"] == 12 == server.version
    assert max(out["staleness"]) >= 1            # slow node 0 comes back late
    assert max(out["staleness"]) <= 1 and out["dropped_stale"] >= 0
    assert [h["step"] for h in out["history"]] == [4, 8, 12]
    assert accuracy[-1] > 0.3


@pytest.mark.slow
def test_event_driven_loop_on_flowers_ray_simulation_engine(monkeypatch):
    pytest.importorskip("ray")
    import os
    from pathlib import Path

    # the Ray actors unpickle PartitionedData by module name: let them import tests/flower_doubles
    tests_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    out = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        server = fl.AFACD(local_lr=0.1, server_lr=2.0, buffer_size=2)
        server.init(fl.trainable_params(model_fn()), 3)
        out.update(flower.run_async(grid, server, num_steps=4, concurrency=2, poll_interval=0.05,
                                    min_nodes=3, timeout=300))

    # Ray pickles the ClientApp: use importable callables, not this module's functions
    import functools

    parts = fl.IID().split(Y[:300].numpy(), 3, 0)
    worker = flower.FlowerWorker(functools.partial(nn.Linear, 64, 10),
                                 PartitionedData(X[:300], Y[:300], parts))
    run_simulation(server_app=server_app, client_app=flower.make_client_app(worker), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert out["steps"] == 4
