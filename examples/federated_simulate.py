"""Simulate an anarchic federation in process: 100 digits workers, AFA-CS vs AFA-CD, and an adapter.

    python examples/federated_simulate.py [--out outputs/federated_example]

Workers join with label-correlated probabilities, choose K ~ U{1..10} local steps and run
at log-normal speeds, so uploads arrive stale and skewed. The run checkpoints every 10
server steps and resumes from the checkpoint when started again. Results (JSON + plot)
land in --out. The last part federates a Bone adapter on a small MLP: only the adapter
tensors travel.
"""
import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import lifelong.federated as fl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/federated_example")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    out = Path(args.out)
    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    train, test = TensorDataset(x[:1437], y[:1437]), TensorDataset(x[1437:], y[1437:])
    labels = y[:1437].numpy()
    parts = fl.ClassesPerWorker(2).split(labels, 100, seed=0)
    anarchy = dict(num_workers=100, steps=args.steps, test_data=test, partition=fl.ClassesPerWorker(2),
                   participation=fl.Bernoulli(fl.label_correlated(labels, parts, beta=0.9)),
                   local_steps=fl.UniformSteps(1, 10), speed=fl.Speed(sigma=0.5),
                   max_concurrent=20, eval_every=10, seed=0)
    for algorithm in (fl.AFACD(local_lr=0.1, server_lr=5.0, buffer_size=10),
                      fl.AFACS(local_lr=0.1, min_new=10)):   # η derived from M and min_new (stable)
        torch.manual_seed(0)
        result = fl.simulate(nn.Linear(64, 10), train, algorithm,
                             checkpoint=out / f"{algorithm.name}.ckpt", **anarchy)
        result.save(out / algorithm.name)
        print(f"{algorithm.name} (η = {algorithm.server_step:.3g}): accuracy {result.final_accuracy:.3f}, "
              f"staleness {result.staleness_histogram}, dropped {result.dropped_stale}, "
              f"participation Gini {result.participation_gini:.2f}, slot age max {result.slot_age_max}")

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = fl.federate_adapter(mlp, "bone", r=8, target_modules=["0", "2"])
    print(f"adapter upload: {fl.adapter_bytes(model)} bytes "
          f"(full model: {sum(p.numel() * 4 for p in mlp.parameters())} bytes)")
    # Bone trains slowly and diverges with large steps (plain SGD, lr 0.5): keep η·η_L small
    result = fl.simulate(model, train, fl.AFACD(local_lr=0.1, server_lr=2.0, buffer_size=10),
                         **anarchy)
    result.save(out / "afa_cd_bone")
    print(f"bone adapter, AFA-CD: accuracy {result.final_accuracy:.3f}, uplink "
          f"{result.history[-1]['uplink_bytes']} bytes")


if __name__ == "__main__":
    main()
