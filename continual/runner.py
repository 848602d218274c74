"""``run_stream``: train a model through a stream with any methods, evaluate after every experience.

The stream is an Avalanche benchmark (tensor classifiers: the digits streams, or any benchmark a
user builds) or a :class:`~lifelong.continual.text.TextStream` (any Hugging Face transformer with
its tokenizer: the stream is tokenized once, and the model becomes a
:class:`~lifelong.continual.text_model.TextClassifier` over the stream's global classes).

The settings are a :class:`~lifelong.continual.config.RunConfig` (keywords of ``run_stream``),
validated once. Methods are registered by name (:mod:`.registry`) and run through one hook
protocol (:mod:`.hooks`) on every engine (:mod:`.engines`): ``"native"`` (a plain torch loop),
``"avalanche"`` (an Avalanche strategy per experience) and ``"trainer"`` (a ``transformers.Trainer``
per experience, with the native loop's loader, optimizer and seeds, so the numbers are the native
loop's). The adapter mode (:mod:`.adapter_modes`) is a hook object too, called before the methods.

After training experience i the model is evaluated on the test set of every experience j
(R[i, j]); before any training once more (b[j], for forward transfer). Accuracies are computed
with torchmetrics on each experience's own test set; in task-incremental scenarios the logits of
each sample are restricted to the classes of its task (during training as well).

Determinism: every experience re-seeds torch from ``(seed, i)`` and shuffles with its own
generator, so a run resumed from the checkpoint written after experience i gives exactly the same
numbers as an uninterrupted one. Checkpoints hold tensors and plain values only (read back with
``weights_only=True``), written atomically; a checkpoint written for another configuration, stream
or tokenizer is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from torch import nn

from ..files import fingerprint as config_fingerprint
from .adapter_modes import Backbone, experience_steps, make_mode
from .config import RunConfig
from .distributed import barrier, init_from_env, is_main
from .engines import make_engine
from .loop import (Experience, evaluate_stream, experience_seed, fingerprint, load_checkpoint, save_checkpoint,
                   task_class_masks)
from .metrics import AccuracyMatrix
from .model import ContinualModel
from .registry import build_methods, capabilities_of, check_run
from .result import StreamResult
from .streams import check_benchmark, experience_classes, scenario_of
from .text import TextStream
from .text_model import TextSetup, unpack_text

__all__ = ["run_stream", "evaluate_stream"]


def run_stream(model: nn.Module, stream, method: Any = "naive", *, method_options: dict | None = None,
               tokenizer=None, criterion: nn.Module | None = None, config: RunConfig | None = None,
               **settings: Any) -> StreamResult:
    """Train ``model`` through ``stream`` and return a :class:`StreamResult` (with ``result.model``).

    Args:
        model: a classifier returning logits (for ``kcl``/``gkcl``: the feature extractor), or, for
            a text stream, any transformers encoder, decoder or encoder-decoder model.
        stream: an Avalanche benchmark with aligned ``train_stream``/``test_stream``, or a
            :class:`TextStream` (``cl_benchmark``, ``text_stream``).
        method: a registered name (``available_methods()``), a method object, or a list of them
            (``["migu", "ewc"]``: hooks called in order); ``method_options`` configure a single
            method given by name (Avalanche-only baselines: the strategy's options).
        tokenizer: the model's tokenizer (text streams only).
        criterion: the loss of (logits, targets); cross-entropy (or the verbalizer's LM loss).
        config: a :class:`RunConfig`; or pass its fields as keywords (``adapter="lora"``,
            ``adapter_mode="per_task"``, ``engine="trainer"``, ``epochs=2``, ``lr=1e-3``, ...).
    """
    settings = _settings(config, settings)
    text, stream, criterion = _text(model, stream, tokenizer, settings, criterion)
    train_exps, test_exps = check_benchmark(stream)
    methods = build_methods(method, method_options)
    engine, scenario, mode = _engine(settings.engine, methods), scenario_of(stream), settings.mode
    check_run(methods, engine=engine, mode=mode, stream="text" if text else "tensor", scenario=scenario,
              fsdp=settings.fsdp)
    if engine == "avalanche" and mode not in (None, "shared"):
        raise ValueError(f"adapter_mode={mode!r} runs in the native or trainer engine (the Avalanche engine keeps one "
                         "optimizer over fixed parameters); use engine='native'")
    device = torch.device(settings.device)
    init_from_env(device)
    masks = task_class_masks(train_exps, scenario)
    torch.manual_seed(settings.seed)
    holder = text.classifier(model) if text is not None else Backbone(model)
    mode_hook = _mode(mode, holder, settings, train_exps, text)
    holder.to(device)
    if engine != "avalanche":
        train_exps = [Experience(e, i) for i, e in enumerate(train_exps)]
    runner = make_engine(engine, holder, methods, mode_hook, settings, criterion or nn.CrossEntropyLoss(), masks,
                         scenario, device)
    if settings.fsdp:
        runner.shard()
    runner.setup(train_exps)
    record = _record(settings, methods, engine, scenario, train_exps, test_exps, text, holder)
    result = _loop(runner, record, settings, train_exps, [Experience(e, j) for j, e in enumerate(test_exps)], masks,
                   device)
    result.metrics.update(mode_hook.metrics())
    result.model = ContinualModel.from_run(runner, text, tokenizer, settings, scenario, masks)
    return result


def _text(model: nn.Module, stream, tokenizer, settings: RunConfig, criterion):
    """A text stream → its setup (tokenized once), the benchmark and the route's criterion."""
    if isinstance(stream, TextStream):
        text = TextSetup(model, stream, tokenizer, settings.max_length, settings.template, settings.route)
        return text, text.benchmark, criterion or text.criterion()
    if tokenizer is not None:
        raise ValueError("tokenizer= is for text streams (cl_benchmark, text_stream); this stream holds tensors")
    return None, stream, criterion


def _settings(config: RunConfig | None, settings: dict) -> RunConfig:
    if config is not None:
        if settings:
            raise ValueError(f"pass config=RunConfig(...) or keyword settings, not both (got {sorted(settings)})")
        if not isinstance(config, RunConfig):
            raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
        config.validate()
        return config
    valid = [f.name for f in fields(RunConfig)]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise TypeError(f"run_stream got unknown setting(s) {unknown}; valid: {', '.join(valid)}")
    return RunConfig(**settings)


def _engine(engine: str, methods: list) -> str:
    """``auto``: native when every method runs there, else Avalanche (Avalanche-only baselines)."""
    if engine != "auto":
        return engine
    return "native" if all("native" in capabilities_of(m).engines for m in methods) else "avalanche"


def _mode(mode: str | None, holder: nn.Module, settings: RunConfig, train_exps: list, text):
    """The adapter mode's hook object, its adapter in place (and task inference when asked)."""
    steps = experience_steps([len(e.dataset) for e in train_exps], settings.epochs, settings.batch_size)
    hook = make_mode(mode, holder, settings.adapter, settings.adapter_options or {}, steps,
                     calibration_samples=settings.calibration_samples, batch_size=settings.batch_size,
                     seed=settings.seed, as_inputs=unpack_text if text is not None else None)
    if settings.task_inference is not None:
        classes = {i: experience_classes(e) for i, e in enumerate(train_exps)}
        hook.build_inference(settings.task_inference, classes, settings.eval_batch_size)
    return hook


def _record(settings: RunConfig, methods: list, engine: str, scenario: str, train_exps, test_exps, text,
            model: nn.Module) -> dict:
    """What the run's checkpoint fingerprints and its result reports (JSON values only)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {
        **settings.describe(), "method": "+".join(m.name for m in methods),
        "method_config": [m.settings() for m in methods], "engine": engine, "scenario": scenario,
        "adapter_mode": settings.mode,
        "stream": [[len(e.dataset) for e in train_exps], [len(e.dataset) for e in test_exps]],
        "text": text.info if text is not None else None,
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "tensors": len(shapes),
                  "shapes_digest": config_fingerprint(shapes)},
    }


def _loop(runner, config: dict, settings: RunConfig, train_exps, test_exps, masks, device) -> StreamResult:
    from tqdm.auto import tqdm

    n, seed, checkpoint_dir = len(train_exps), settings.seed, settings.checkpoint_dir
    matrix = AccuracyMatrix(n)
    start, elapsed, steps, step_time = 0, 0.0, 0, 0.0
    state = load_checkpoint(checkpoint_dir, config, experiences=n) if settings.resume else None
    if state is not None:
        runner.load_state_dict(state["runner"], train_exps)
        matrix = AccuracyMatrix.from_array(state["matrix"].numpy(), state["initial"].numpy())
        start, elapsed = int(state["completed"]), float(state["elapsed"])
        steps, step_time = int(state["steps"]), float(state["step_time"])
    t0 = time.perf_counter()
    future = settings.forward_transfer
    evaluate = lambda shown: evaluate_stream(runner.predict, shown, masks, settings.eval_batch_size, device,  # noqa: E731
                                             split=not settings.fsdp)
    if start == 0 and future:
        torch.manual_seed(experience_seed(seed, -1))
        for j, a in enumerate(evaluate(test_exps)):
            if not np.isnan(a):
                matrix.record_initial(j, a)
    bar = tqdm(range(start, n), desc=f"{config['method']} ({config['engine']})",
               disable=not settings.progress or not is_main(), initial=start, total=n, unit="exp")
    board = _board(settings.tensorboard) if is_main() else None
    for i in bar:
        torch.manual_seed(experience_seed(seed, i))
        s, st = runner.train_experience(i, train_exps)
        steps, step_time = steps + s, step_time + st
        torch.manual_seed(experience_seed(seed, i) + 1)
        for j, a in enumerate(evaluate(test_exps if future else test_exps[: i + 1])):
            if not np.isnan(a):
                matrix.record(i, j, a)
        row = matrix.as_array()[i, : i + 1]
        bar.set_postfix(avg_acc=f"{np.nanmean(row):.3f}", steps_per_s=f"{steps / max(step_time, 1e-9):.1f}")
        if board is not None:
            _log_experience(board, i, matrix.as_array()[i], (config.get("text") or {}).get("tasks"), steps / max(step_time, 1e-9))
        state = runner.state_dict() if checkpoint_dir is not None else None  # a collective under FSDP
        if checkpoint_dir is not None and is_main():
            save_checkpoint(checkpoint_dir, {
                "fingerprint": fingerprint(config), "config": json.dumps(config, sort_keys=True, default=str),
                "completed": i + 1, "elapsed": elapsed + time.perf_counter() - t0, "steps": steps,
                "step_time": step_time, "matrix": torch.from_numpy(matrix.as_array()),
                "initial": torch.from_numpy(matrix.initial()), "runner": state})
        barrier()  # no process runs ahead of a checkpoint being written
    bar.close()
    if board is not None:
        board.close()
    return StreamResult(
        method=config["method"], engine=config["engine"], scenario=config["scenario"], seed=seed,
        accuracy_matrix=matrix.as_array().tolist(), initial_accuracy=matrix.initial().tolist(),
        wall_time_s=elapsed + time.perf_counter() - t0, train_steps=steps,
        step_time_s=step_time / max(steps, 1), trainable_parameters=runner.trainable_parameters(),
        memory=runner.memory(), config=json.loads(json.dumps(config, default=str)))


def _board(folder):
    """A TensorBoard writer for ``folder`` (None: no logging)."""
    if folder is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


def _log_experience(board, i: int, row: np.ndarray, names: list[str] | None, steps_per_s: float) -> None:
    """Accuracy on every experience measured after training experience ``i`` (x axis: experience index)."""
    for j, a in enumerate(row):
        if not np.isnan(a):
            board.add_scalar(f"accuracy/{names[j] if names else j}", float(a), i)
    board.add_scalar("accuracy/average_seen", float(np.nanmean(row[: i + 1])), i)
    board.add_scalar("speed/steps_per_s", float(steps_per_s), i)
    board.flush()
