"""Continual learning with a registry adapter and with the kernel methods (KCL, GKCL).

    python examples/continual_adapter_kernel.py

1. An MLP pre-trained on the original digits, then a permuted-digits stream where only a LaMDA
   adapter trains, with MIGU masking the adapter's rows (the frozen base stays untouched).
2. A task-incremental split-digits stream with KCL (stored coreset) and GKCL (generator instead of
   the coreset), printing accuracy and the memory each keeps.
"""

import warnings

import torch
from torch import nn

import lifelong.continual as lc


def pretrained(dataset) -> nn.Module:
    """The base model: an MLP trained a few epochs on the original (unpermuted) digits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for x, y, *_ in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    stream = lc.permuted_digits(4, seed=0)
    base = pretrained(stream.train_stream[0].dataset)
    res = lc.run_stream(base, stream, lc.MIGU(mask_ratio=0.5), adapter="lamda",
                        adapter_options={"r": 8, "target_modules": ["0", "2"]}, epochs=3, lr=0.1, progress=False)
    print(f"LaMDA + MIGU on permuted digits: ACC {100 * res.acc:.1f}  forgetting {100 * res.forgetting:.1f}  "
          f"trainable params {res.trainable_parameters:,}")

    tasks = lc.split_digits(5, task_incremental=True, seed=0)
    for method in (lc.KCL(samples_per_class=20), lc.GKCL(samples_per_class=20, gen_epochs=20)):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128))
        res = lc.run_stream(backbone, tasks, method, epochs=1, lr=0.1, batch_size=10, progress=False)
        print(f"{method.name.upper():5s} task-IL split digits: ACC {100 * res.acc:.1f}  "
              f"forgetting {100 * res.forgetting:.1f}  memory {res.memory}")


if __name__ == "__main__":
    main()
