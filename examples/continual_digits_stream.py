"""Compare continual-learning methods on a split-digits stream in a few lines.

    python examples/continual_digits_stream.py [--out runs/continual_example]

Runs plain fine-tuning, MIGU, CLASSP and power-law rehearsal (native loop) and EWC (Avalanche) on
5 two-class tasks (class-incremental), prints ACC / forgetting / BWT, and saves each result as JSON.
Runs checkpoint after every task: rerun the command to resume an interrupted one.
"""

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

import lifelong.continual as lc


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/continual_example"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    stream = lc.split_digits(5, seed=0)
    runs = {
        "naive": {},
        "migu": {"method_options": {"mask_ratio": 0.7}},
        "classp": {"method_options": {"threshold": 0.0}},
        "powerlaw": {"method_options": {"alpha": 1.0, "ratio": 0.25}},
        "ewc": {"method_options": {"ewc_lambda": 100.0}},
    }
    print(f"{'method':10s} {'ACC':>6s} {'forget':>7s} {'BWT':>7s} {'wall s':>7s}")
    for method, kw in runs.items():
        res = lc.run_stream(mlp(), stream, method, epochs=3, lr=0.05, batch_size=32, seed=0,
                            checkpoint_dir=str(args.out / method), resume=True, **kw)
        res.to_json(str(args.out / f"{method}.json"))
        print(f"{method:10s} {100 * res.acc:6.1f} {100 * res.forgetting:7.1f} {100 * res.bwt:7.1f} {res.wall_time_s:7.1f}")


if __name__ == "__main__":
    main()
