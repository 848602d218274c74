"""Continual fine-tuning of the pretrained MiniLM through a stream of real text tasks.

Three ways to run the same stream:

1. ``run_stream`` with a registry adapter and a continual method (here KORE in sequential mode:
   each task's adapter is calibrated on the earlier tasks' inputs, so it leaves them alone);
2. ``run_stream(engine="trainer")``: every task trained by a ``transformers.Trainer``;
3. an Avalanche strategy used directly: the tokenized benchmark and a ``TextClassifier``.

The stream is the standard-library docstrings (shipped with Python) or, with ``--folder``, the
CL_Benchmark tasks of the O-LoRA / MIGU papers (AG News → Amazon → SST-2 → IMDB):

    python examples/continual_text_stream.py [--folder ../shared/data/cl_benchmark] [--smoke]
"""

from __future__ import annotations

import argparse

import torch

import lifelong.continual as lc
from lifelong.models import load_minilm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", help="a CL_Benchmark folder (default: the stdlib docstring stream)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args()
    per_class = 4 if args.smoke else 30
    if args.folder:
        stream = lc.cl_benchmark(args.folder, tasks="text4", n_train=per_class, n_test=per_class)
    else:
        stream = lc.stdlib_stream(areas=["numbers", "time"] if args.smoke else lc.stdlib_text.DEFAULT_AREAS,
                                  per_class=per_class + 10)
    print("stream:", stream.describe())
    common = dict(max_length=32 if args.smoke else 64, batch_size=8, optimizer="adam", lr=1e-3, progress=False)

    # 1. KORE, sequential: the adapter of task t is calibrated on tasks < t.
    model, tokenizer = load_minilm()
    kore = lc.run_stream(model, stream, "naive", tokenizer=tokenizer, adapter="kore", adapter_mode="sequential",
                         adapter_options={"r": 8, "progress": False}, calibration_samples=16, **common)
    print(f"KORE sequential: ACC {kore.acc:.3f}, forgetting {kore.forgetting:.3f}, "
          f"trainable {kore.trainable_parameters:,}")

    # 2. The same stream, each task trained by transformers.Trainer, with MIGU's gradient masking.
    model, tokenizer = load_minilm()
    migu = lc.run_stream(model, stream, "migu", tokenizer=tokenizer, adapter="bone", adapter_options={"r": 8},
                         engine="trainer", **common)
    print(f"MIGU with the HF Trainer: ACC {migu.acc:.3f}, BWT {migu.bwt:.3f}")

    # 3. An Avalanche strategy on the tokenized stream.
    from avalanche.training.supervised import EWC

    from lifelong.continual.engines.avalanche import silent_evaluator
    from lifelong.continual.loop import Experience, evaluate_stream, task_class_masks

    model, tokenizer = load_minilm()
    benchmark = stream.to_benchmark(tokenizer, max_length=common["max_length"])
    torch.manual_seed(0)
    classifier = lc.TextClassifier(model, num_classes=len(stream.class_names))
    strategy = EWC(model=classifier, optimizer=torch.optim.Adam(classifier.parameters(), lr=5e-5),
                   criterion=torch.nn.CrossEntropyLoss(), ewc_lambda=100.0, train_mb_size=8, train_epochs=1,
                   eval_mb_size=64, evaluator=silent_evaluator())
    for experience in benchmark.train_stream:
        strategy.train(experience)
    tests = [Experience(e, j) for j, e in enumerate(benchmark.test_stream)]
    masks = task_class_masks(list(benchmark.train_stream), stream.scenario)
    accs = evaluate_stream(lambda x, t, j: classifier.eval()(x), tests, masks, 64, "cpu")
    print("EWC with Avalanche: final accuracy per task", [round(a, 3) for a in accs])


if __name__ == "__main__":
    main()
