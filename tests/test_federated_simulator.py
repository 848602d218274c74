"""The in-process anarchic simulator: a zero delay bound is synchronous, staleness accounting,
determinism per seed, only trainable parameters travel; faults, resume, partitions."""
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import lifelong.federated as fl
from lifelong.federated.simulator import _job_seed


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    return TensorDataset(x[:600], y[:600]), TensorDataset(x[1500:], y[1500:])


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 10)


def run(digits, algorithm, seed=0, model=None, **kw):
    train, test = digits
    opts = dict(num_workers=12, steps=12, test_data=test, partition=fl.Dirichlet(0.5),
                participation=fl.Bernoulli(0.7), local_steps=fl.UniformSteps(1, 4),
                speed=fl.Speed(sigma=0.8), eval_every=4, seed=seed, progress=False)
    opts.update(kw)
    return fl.simulate(model or linear(), train, algorithm, **opts)


def test_zero_delay_bound_equals_a_synchronous_replay(digits):
    res = run(digits, fl.AFACD(local_lr=0.2, server_lr=2.0, buffer_size=3, max_staleness=0),
              record_arrivals=True)
    assert set(res.staleness_histogram) == {0}
    assert res.dropped_stale > 0              # heterogeneous speeds do produce stale uploads
    # replay the consumed arrival sets synchronously, from scratch, with the same job seeds
    train, _ = digits
    model = linear()
    trainer = fl.LocalTrainer(model, *train.tensors)
    parts = fl.Dirichlet(0.5).split(train.tensors[1].numpy(), 12, 0)
    server = fl.AFACD(local_lr=0.2, server_lr=2.0, buffer_size=3, max_staleness=0)
    server.init(fl.trainable_params(model), 12)
    for a in res.arrivals:
        if a["status"] != "accepted":
            continue
        assert a["base_version"] == server.version
        delta, _ = trainer.run(server.params, parts[a["worker"]], a["local_steps"], 0.2,
                               _job_seed(0, a["worker"], a["job"]))
        server.submit(fl.Update(a["worker"], delta, server.version, a["local_steps"]))
    assert server.version == res.steps == 12
    for name, value in server.params.items():
        assert torch.equal(value, res.final_params[name])


def test_staleness_accounting_matches_the_arrival_log(digits):
    res = run(digits, fl.AFACD(local_lr=0.2, server_lr=2.0, buffer_size=2, max_staleness=2),
              record_arrivals=True, steps=20)
    accepted = [a["staleness"] for a in res.arrivals if a["status"] == "accepted"]
    dropped = [a for a in res.arrivals if a["status"] == "dropped_stale"]
    for a in res.arrivals:
        if a["staleness"] is not None:
            assert a["staleness"] >= 0
    assert max(accepted) <= 2
    assert all(a["staleness"] > 2 for a in dropped)
    assert res.dropped_stale == len(dropped) > 0
    consumed = {}
    for tau in accepted[:2 * res.steps]:   # uploads still in the buffer were not consumed yet
        consumed[tau] = consumed.get(tau, 0) + 1
    assert res.staleness_histogram == consumed
    assert sum(res.participation) == len(accepted)


def test_same_seed_is_bit_identical_and_other_seed_differs(digits):
    algo = lambda: fl.AFACS(local_lr=0.2, server_lr=2.0, max_staleness=3)  # noqa: E731
    a, b, c = run(digits, algo()), run(digits, algo()), run(digits, algo(), seed=1)
    for name in a.final_params:
        assert torch.equal(a.final_params[name], b.final_params[name])
    assert a.history == b.history and a.staleness_histogram == b.staleness_histogram
    assert not torch.equal(a.final_params["weight"], c.final_params["weight"])


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(64, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)
        self.frozen.requires_grad_(False)
        self.norm.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.frozen(x))))


def test_only_trainable_parameters_travel_and_change(digits):
    model = Mixed()
    frozen = {n: t.clone() for n, t in model.state_dict().items() if not n.startswith("head")}
    head0 = model.head.weight.detach().clone()
    res = run(digits, fl.AFACD(local_lr=0.1, server_lr=1.0, buffer_size=3), model=model,
              record_arrivals=True)
    assert sorted(res.final_params) == ["head.bias", "head.weight"]
    assert res.config["params"]["names"] == ["head.weight", "head.bias"]
    for name, value in model.state_dict().items():
        if name in frozen:   # frozen weights and BatchNorm buffers, incl. num_batches_tracked
            assert torch.equal(value, frozen[name]), name
    assert not torch.equal(model.head.weight, head0)
    assert torch.equal(model.head.weight.detach(), res.final_params["head.weight"])
    bytes_per_upload = (16 * 10 + 10) * 4
    uploads = sum(1 for a in res.arrivals)
    assert res.history[-1]["uplink_bytes"] == uploads * bytes_per_upload


@pytest.mark.parametrize("algorithm", [
    fl.AFACD(local_lr=0.2, server_lr=2.0, buffer_size=3),
    fl.AFACS(local_lr=0.2, server_lr=2.0),
    fl.FedBuff(local_lr=0.2, buffer_size=3),
    fl.FedAvg(local_lr=0.2, cohort_size=4),
    fl.MIFA(local_lr=0.2, min_fraction=0.0),
], ids=lambda a: a.name)
def test_faulty_workers_are_rejected_and_the_federation_continues(digits, algorithm):
    steps = 6 if algorithm.synchronous else 12
    res = run(digits, algorithm, num_workers=10, faults=fl.Faults(fraction=0.4), steps=steps,
              record_arrivals=True)
    assert res.steps == steps and not res.stopped_early
    assert all(torch.isfinite(t).all() for t in res.final_params.values())
    assert res.crashed > 0
    assert res.rejected.get("nonfinite", 0) > 0 and res.rejected.get("shape", 0) > 0
    # no upload from a faulty worker was ever accepted (prob = 1: every job of theirs is faulty)
    f = fl.Faults(fraction=0.4)
    f.bind(10, 0)
    assert sorted(f.kind_of.values()) == ["crash", "inf", "nan", "shape"]
    assert all(a["worker"] not in f.kind_of for a in res.arrivals if a["status"] == "accepted")
    assert res.history[-1]["accuracy"] > res.history[0]["accuracy"] + 0.05   # it still learns


def test_checkpoint_resume_is_bit_identical(digits, tmp_path):
    ckpt = tmp_path / "fed.pt"
    algo = lambda: fl.AFACD(local_lr=0.2, server_lr=2.0, buffer_size=3, max_staleness=4)  # noqa: E731
    full = run(digits, algo(), steps=8)
    first = run(digits, algo(), steps=4, checkpoint=ckpt, checkpoint_every=2)
    assert first.steps == 4 and ckpt.exists()
    resumed = run(digits, algo(), steps=8, checkpoint=ckpt, checkpoint_every=2)
    for name in full.final_params:
        assert torch.equal(full.final_params[name], resumed.final_params[name])
    assert full.history == resumed.history
    assert full.staleness_histogram == resumed.staleness_histogram
    with pytest.raises(ValueError, match="another configuration.*algorithm"):
        run(digits, fl.AFACD(local_lr=0.3, server_lr=2.0, buffer_size=3), steps=8, checkpoint=ckpt)


def test_warm_start_and_round_based_engines_run(digits):
    cs = run(digits, fl.AFACS(local_lr=0.2, server_lr=2.0, cs_init="warm_start"), steps=4)
    assert cs.steps == 4 and sum(cs.jobs_started) >= 12 + 4   # one warm-start job per worker
    fa = run(digits, fl.FedAvg(local_lr=0.2, server_lr=1.0, cohort_size=4), record_arrivals=True,
             steps=4)
    assert set(fa.staleness_histogram) == {0}
    per_round = {}
    for a in fa.arrivals:
        per_round[a["base_version"]] = per_round.get(a["base_version"], 0) + 1
    assert max(per_round.values()) <= 4


def test_result_json_and_plot(digits, tmp_path):
    res = run(digits, fl.AFACD(local_lr=0.2, server_lr=2.0, buffer_size=3), steps=6, eval_every=2)
    path = res.save(tmp_path / "out")
    assert (tmp_path / "out" / "result.png").stat().st_size > 1000
    raw = json.loads(path.read_text())
    assert raw["steps"] == 6 and len(raw["participation"]) == 12
    assert [h["step"] for h in raw["history"]] == [0, 2, 4, 6]
    for key in ("accuracy", "loss", "time", "uplink_bytes", "downlink_bytes", "local_steps"):
        assert key in raw["history"][-1]
    back = fl.SimulationResult.load(path)
    assert back.staleness_histogram == res.staleness_histogram
    assert back.final_accuracy == res.final_accuracy
    times = [h["time"] for h in res.history]
    assert times == sorted(times)


def test_partitions_are_disjoint_deterministic_and_skewed():
    labels = np.repeat(np.arange(10), 30)
    for part in (fl.IID(), fl.Dirichlet(0.1), fl.Dirichlet(0.1, over="workers"), fl.Shards(2),
                 fl.ClassesPerWorker(2)):
        a, b = part.split(labels, 10, 3), part.split(labels, 10, 3)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        flat = np.concatenate(a)
        assert len(flat) == len(set(flat.tolist()))
    assert sorted(np.concatenate(fl.IID().split(labels, 7, 0)).tolist()) == list(range(300))
    assert all(len(np.unique(labels[p])) == 2 for p in fl.ClassesPerWorker(2).split(labels, 10, 0))
    assert all(len(np.unique(labels[p])) <= 2 for p in fl.Shards(2).split(labels, 10, 0))
    skew = [len(np.unique(labels[p])) for p in fl.Dirichlet(0.05).split(labels, 10, 0)]
    even = [len(np.unique(labels[p])) for p in fl.Dirichlet(100.0).split(labels, 10, 0)]
    assert np.mean(skew) < np.mean(even)
    per_worker = fl.Dirichlet(0.1, over="workers").split(labels, 20, 0)
    assert sorted(np.concatenate(per_worker).tolist()) == list(range(300))
    assert {len(p) for p in per_worker} == {15}
    mixed = [len(np.unique(labels[p])) for p in fl.Dirichlet(100.0, over="workers").split(labels, 20, 0)]
    assert np.mean([len(np.unique(labels[p])) for p in per_worker]) < np.mean(mixed)


def test_participation_models():
    markov = fl.MarkovOnOff(mean_on=3.0, mean_off=1.0)
    markov.bind(200, 0)
    on = np.mean([markov.available_mask(float(t), 0).mean() for t in range(0, 400, 10)])
    assert abs(on - 0.75) < 0.05
    periodic = fl.Periodic(period=10.0, duty=0.3)
    periodic.bind(500, 0)
    assert abs(periodic.available_mask(3.0, 0).mean() - 0.3) < 0.07
    start = periodic.next_start(0, 3.0, 0)
    assert periodic.available_mask(start, 0)[0] and start >= 3.0
    bern = fl.Bernoulli([0.0, 1.0])
    bern.bind(2, 0)
    assert bern.next_start(0, 1.0, 0) is None and bern.next_start(1, 1.0, 0) == 1.0


def test_trace_participation_from_file(tmp_path, digits):
    path = tmp_path / "trace.csv"
    path.write_text("worker,t_on,t_off\n0,0,50\n1,0,50\n2,10,20\n")
    trace = fl.Trace.from_file(path)
    trace.bind(3, 0)
    assert trace.next_start(2, 0.0, 0) == 10.0 and trace.next_start(2, 25.0, 0) is None
    res = run(digits, fl.AFACD(local_lr=0.2, buffer_size=1), num_workers=3, steps=10_000,
              participation=trace, partition=fl.IID())
    assert res.stopped_early and res.virtual_time <= 50 + 4 * np.exp(3 * 0.8) + 1
    (tmp_path / "bad.json").write_text(json.dumps({"0": [[0, 1]], "7": [[0, 1]]}))
    with pytest.raises(ValueError, match=r"unknown workers \[7\]"):
        run(digits, fl.AFACD(), num_workers=3, participation=fl.Trace.from_file(tmp_path / "bad.json"))


def test_bad_input_fails_clearly(digits):
    with pytest.raises(ValueError, match="num_workers"):
        run(digits, fl.AFACD(), num_workers=0)
    with pytest.raises(ValueError, match="alpha"):
        fl.Dirichlet(0.0)
    with pytest.raises(ValueError, match="more than the 600 samples"):
        run(digits, fl.AFACD(), num_workers=400, partition=fl.Shards(2))
    with pytest.raises(ValueError, match="local steps"):
        fl.UniformSteps(0, 3)
    with pytest.raises(ValueError, match="probabilities"):
        fl.Bernoulli(1.5)


@pytest.mark.slow
def test_thousand_workers_hundred_steps_under_a_minute(digits):
    import time

    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    train, test = TensorDataset(x[:1437], y[:1437]), digits[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: one thread avoids contention (as the benchmark)
    start = time.perf_counter()
    res = fl.simulate(linear(), train, fl.AFACD(local_lr=0.1, server_lr=5.0, buffer_size=10),
                      num_workers=1000, steps=100, test_data=test, partition=fl.IID(),
                      participation=fl.Bernoulli(0.5), local_steps=fl.UniformSteps(1, 10),
                      speed=fl.Speed(sigma=0.5), max_concurrent=100, eval_every=100, progress=False)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    assert res.steps == 100
    assert seconds < 60


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a torch file"])
def test_an_empty_or_corrupt_checkpoint_restarts_the_run_with_a_warning(digits, tmp_path, damage):
    from lifelong.checkpoint import load as load_checkpoint
    from lifelong.files import fingerprint

    ckpt = tmp_path / "fed.pt"
    algo = lambda: fl.AFACD(local_lr=0.2, server_lr=2.0, buffer_size=3)  # noqa: E731
    full = run(digits, algo(), steps=4)
    ckpt.write_bytes(damage)
    with pytest.warns(RuntimeWarning, match="fed.pt' is empty or corrupt"):
        again = run(digits, algo(), steps=4, checkpoint=ckpt, checkpoint_every=2)
    assert full.history == again.history
    state = load_checkpoint(ckpt)   # rewritten whole, and fingerprinted with the shared helper
    assert state["fingerprint"] == fingerprint(state["config"])
