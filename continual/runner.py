"""``run_stream``: train a model through a stream with any method, evaluate after every experience.

The stream is an Avalanche benchmark (tensor classifiers: the digits streams, or any benchmark a
user builds) or a :class:`~lifelong.continual.text.TextStream` (any Hugging Face transformer with
its tokenizer: the stream is tokenized once, and the model becomes a
:class:`~lifelong.continual.text_model.TextClassifier` over the stream's global classes).

Three engines share the evaluation, checkpointing and result code (:mod:`.loop`) and call every
method through the same hooks (:class:`~lifelong.continual.method.ContinualMethod`):

* ``"native"``: a plain torch loop (forward → backward → ``after_backward`` → step →
  ``after_update``); methods ``naive``, ``migu``, ``classp``, ``powerlaw``, ``kcl``, ``gkcl``.
* ``"avalanche"``: an Avalanche strategy per experience (``strategy.train(exp)``), with each
  method's plugin, and every Avalanche baseline (``naive``, ``ewc``, ``replay``, ``lwf``, ``si``,
  ``agem``, ``gem``, ``mas``, ``cumulative``).
* ``"trainer"``: each experience trained by a ``transformers.Trainer`` (:mod:`.hf_bridge`), with
  the native loop's loader, optimizer and seeds, so the numbers are the native loop's.

Adapters (``adapter=<registry name>``) run in one of three modes: ``"shared"`` (one adapter
trained through the whole stream), ``"per_task"`` (one adapter per experience, test experience j
routed to adapter j) and ``"sequential"`` (KORE / CorDA: before experience t the previous adapter
is merged and a new one is calibrated on experiences < t; see :mod:`.sequential`).

After training experience i the model is evaluated on the test set of every experience j
(R[i, j]); before any training once more (b[j], for forward transfer). Accuracies are computed
with torchmetrics on each experience's own test set; in task-incremental scenarios the logits of
each sample are restricted to the classes of its task (during training as well).

Determinism: every experience re-seeds torch from ``(seed, i)`` and shuffles with its own
generator, so a run resumed from the checkpoint written after experience i gives exactly the same
numbers as an uninterrupted one. Checkpoints are ``torch.save`` dicts of tensors and plain values
only (read back with ``weights_only=True``), written atomically; a checkpoint written for another
configuration, stream or tokenizer is refused.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from torch import nn

from ..checks import positive_int
from .classp import ClasspMethod
from .loop import (Experience, evaluate_stream, experience_seed, fingerprint, load_checkpoint, make_optimizer,
                   restrict_logits, save_checkpoint, set_candidates, shuffled_loader, task_class_masks, trainable,
                   unpack)
from .method import AvalancheBaseline, ContinualMethod
from .metrics import AccuracyMatrix
from .migu import MIGU
from .powerlaw_replay import PowerLawReplay
from .result import StreamResult
from .streams import check_benchmark, scenario_of
from .text import TextStream

__all__ = ["run_stream", "method_object", "METHODS", "AVALANCHE_BASELINES", "ADAPTER_MODES", "evaluate_stream"]

NATIVE_METHODS = ("naive", "migu", "classp", "powerlaw", "kcl", "gkcl")
AVALANCHE_BASELINES = ("naive", "ewc", "replay", "lwf", "si", "agem", "gem", "mas", "cumulative")
METHODS = tuple(sorted(set(NATIVE_METHODS) | set(AVALANCHE_BASELINES)))
ENGINES = ("auto", "native", "avalanche", "trainer")
ADAPTER_MODES = ("shared", "per_task", "sequential")


def method_object(method, options: dict) -> ContinualMethod:
    """A method name (with its options) or a method object → the method object."""
    from .gkcl import GKCL
    from .kcl import KCL

    if isinstance(method, ContinualMethod):
        if options:
            raise ValueError("method_options only apply to a method given by name; configure the object instead")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name ({', '.join(METHODS)}) or a ContinualMethod object "
                        f"(MIGU, PowerLawReplay, KCL, GKCL, ...), got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    factories = {"naive": ContinualMethod, "migu": MIGU, "classp": ClasspMethod, "powerlaw": PowerLawReplay,
                 "kcl": KCL, "gkcl": GKCL}
    if method == "naive" and options:
        raise ValueError(f"method 'naive' takes no options, got {sorted(options)}")
    if method in factories:
        return factories[method](**options)
    return AvalancheBaseline(method, **options)


def _adapter_mode(adapter, adapter_mode: str | None, per_task_adapter: bool) -> str | None:
    if adapter_mode is None:
        adapter_mode = "per_task" if per_task_adapter else "shared"
    elif per_task_adapter and adapter_mode != "per_task":
        raise ValueError(f"per_task_adapter=True contradicts adapter_mode={adapter_mode!r}")
    if adapter_mode not in ADAPTER_MODES:
        raise ValueError(f"unknown adapter_mode {adapter_mode!r}; valid: {', '.join(ADAPTER_MODES)}")
    if adapter is None:
        if adapter_mode != "shared":
            asked = "per_task_adapter=True" if per_task_adapter else f"adapter_mode={adapter_mode!r}"
            raise ValueError(f"{asked} needs adapter=<registry name>")
        return None
    return adapter_mode


def run_stream(model: nn.Module, stream, method="naive", *, method_options: dict | None = None,
               adapter: str | None = None, adapter_options: dict | None = None, per_task_adapter: bool = False,
               adapter_mode: str | None = None, calibration_samples: int = 256, engine: str = "auto",
               optimizer="sgd", epochs: int = 1, lr: float = 0.01, batch_size: int = 32,
               eval_batch_size: int = 512, seed: int = 0, device: str | torch.device = "cpu",
               checkpoint_dir: str | None = None, resume: bool = False, progress: bool = True,
               criterion: nn.Module | None = None, tokenizer=None, max_length: int = 128,
               template: str = "{text}", route: str = "auto", forward_transfer: bool = True,
               training_args: dict | None = None) -> StreamResult:
    """Train ``model`` through ``stream`` and return a :class:`StreamResult`.

    Args:
        model: a classifier returning logits (for ``kcl``/``gkcl``: the feature extractor), or, for
            a text stream, any transformers encoder, decoder or encoder-decoder model.
        stream: an Avalanche benchmark with aligned ``train_stream``/``test_stream``, or a
            :class:`TextStream` (``cl_benchmark``, ``text_stream``).
        method: one of ``METHODS`` or a method object; ``method_options`` are passed to the
            method's constructor (Avalanche baselines: to the strategy, e.g. ``{"ewc_lambda": 100}``).
        adapter, adapter_options: a registry adapter put on the model (``lifelong.wrap``); only its
            parameters (and a text classifier's head) train.
        adapter_mode: ``"shared"`` (default), ``"per_task"`` (one adapter per experience, routed by
            the experience index, an oracle in class/domain-incremental streams; also
            ``per_task_adapter=True``) or ``"sequential"`` (``kore``/``corda``: each experience's
            adapter calibrated on ``calibration_samples`` inputs of every earlier experience).
        engine: ``"native"``, ``"avalanche"``, ``"trainer"`` (each experience trained by a
            ``transformers.Trainer``; ``training_args`` override its ``TrainingArguments``) or
            ``"auto"`` (native for our methods and naive, Avalanche for the baselines).
        optimizer: ``"sgd"``, ``"adam"`` or a callable ``params -> Optimizer`` (ignored by classp).
        checkpoint_dir, resume: checkpoint after every experience; ``resume=True`` continues from it.
        tokenizer, max_length, template, route: text streams only. ``template`` formats each text
            (``"{text}"``); ``route`` is ``"head"`` (classification head), ``"verbalizer"``
            (label-text scoring) or ``"auto"`` (verbalizer for language models).
        forward_transfer: also evaluate before training and on experiences not trained yet (the
            accuracy matrix above its diagonal, needed only for FWT); False halves evaluation.
    """
    method_options = dict(method_options or {})
    adapter_options = dict(adapter_options or {})
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        positive_int(name, value)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    mode = _adapter_mode(adapter, adapter_mode, per_task_adapter)
    text = None
    if isinstance(stream, TextStream):
        from .text_model import TextSetup

        text = TextSetup(model, stream, tokenizer, max_length, template, route)
        stream = text.benchmark
        criterion = criterion or text.criterion()
    elif tokenizer is not None:
        raise ValueError("tokenizer= is for text streams (cl_benchmark, text_stream); this stream holds tensors")
    train_exps, test_exps = check_benchmark(stream)
    method_obj = method_object(method, method_options)
    name = method_obj.name
    if engine == "auto":
        engine = "native" if method_obj.native else "avalanche"
    if engine in ("native", "trainer") and (not method_obj.native or (engine == "trainer" and method_obj.owns_loop)):
        where = "only in the Avalanche engine" if not method_obj.native else "in the native or Avalanche engine"
        raise ValueError(f"method {name!r} does not run in the {engine} engine (it runs {where}); the {engine} "
                         f"engine runs naive, migu, classp, powerlaw{', kcl, gkcl' if engine == 'native' else ''}")
    if training_args is not None and engine != "trainer":
        raise ValueError("training_args are for engine='trainer'")
    if mode in ("per_task", "sequential") and (engine == "avalanche" or method_obj.owns_loop):
        raise ValueError(f"adapter_mode={mode!r} runs in the native engine with naive, migu, classp or powerlaw")
    if text is not None and method_obj.owns_loop:
        raise ValueError(f"method {name!r} trains on tensor features only; text streams run naive, migu, classp, "
                         "powerlaw and the Avalanche baselines")
    device = torch.device(device)
    scenario = scenario_of(stream)
    masks = task_class_masks(train_exps, scenario)
    criterion = criterion or nn.CrossEntropyLoss()

    torch.manual_seed(seed)
    model, sequential = _build_model(model, text, adapter, adapter_options, mode, calibration_samples,
                                     batch_size, seed)
    model = model.to(device)
    config = {
        "method": name, "method_config": method_obj.config(),
        "engine": engine, "scenario": scenario, "adapter": adapter, "adapter_options": adapter_options,
        "adapter_mode": mode, "calibration_samples": calibration_samples if mode == "sequential" else None,
        "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "callable"),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "forward_transfer": forward_transfer,
        "stream": [[len(e.dataset) for e in train_exps], [len(e.dataset) for e in test_exps]],
        "text": text.info if text is not None else None,
        "model": {k: list(v.shape) for k, v in model.state_dict().items()},
    }
    test_sets = [Experience(e, j) for j, e in enumerate(test_exps)]
    if engine == "avalanche":
        from .avalanche_bridge import AvalancheEngine

        runner = AvalancheEngine(model, method_obj, optimizer, lr, epochs, batch_size, eval_batch_size, device,
                                 criterion, masks, train_exps, seed)
    else:
        train_exps = [Experience(e, i) for i, e in enumerate(train_exps)]
        args = (model, method_obj, optimizer, lr, epochs, batch_size, device, criterion, masks, train_exps, seed,
                sequential)
        if engine == "trainer":
            from .hf_bridge import TrainerEngine

            runner = TrainerEngine(*args, training_args=training_args)
        else:
            runner = NativeEngine(*args)
    return _loop(runner, config, train_exps, test_sets, masks, eval_batch_size, device, seed, checkpoint_dir,
                 resume, progress)


def _build_model(model: nn.Module, text, adapter, adapter_options: dict, mode: str | None, samples: int,
                 batch_size: int, seed: int):
    """Put the adapter on the model (or prepare the sequential one) and the text head around it."""
    from .sequential import Backbone, SequentialAdapters
    from .text_model import unpack_text

    if mode == "per_task":
        from lifelong.adapters.routing import TaskRoutedModel

        model = TaskRoutedModel(model, adapter, **adapter_options)
    elif mode == "shared":
        import lifelong

        model = lifelong.wrap(model, adapter, **adapter_options)
    if text is not None:
        model = text.classifier(model)
    elif mode == "sequential":
        model = Backbone(model)
    sequential = None
    if mode == "sequential":
        sequential = SequentialAdapters(model, adapter, adapter_options, samples, batch_size, seed,
                                        as_inputs=unpack_text if text is not None else (lambda x: x))
    return model, sequential


def _loop(runner, config, train_exps, test_exps, masks, eval_batch_size, device, seed, checkpoint_dir, resume,
          progress) -> StreamResult:
    from tqdm.auto import tqdm

    n = len(train_exps)
    matrix = AccuracyMatrix(n)
    start, elapsed, steps, step_time = 0, 0.0, 0, 0.0
    state = load_checkpoint(checkpoint_dir, config) if resume else None
    if state is not None:
        runner.load_state_dict(state["runner"], train_exps)
        matrix = AccuracyMatrix.from_array(state["matrix"].numpy(), state["initial"].numpy())
        start, elapsed = int(state["completed"]), float(state["elapsed"])
        steps, step_time = int(state["steps"]), float(state["step_time"])
    t0 = time.perf_counter()
    future = config["forward_transfer"]
    if start == 0 and future:
        torch.manual_seed(experience_seed(seed, -1))
        for j, a in enumerate(evaluate_stream(runner.predict, test_exps, masks, eval_batch_size, device)):
            if not np.isnan(a):
                matrix.record_initial(j, a)
    bar = tqdm(range(start, n), desc=f"{config['method']} ({config['engine']})", disable=not progress,
               initial=start, total=n, unit="exp")
    for i in bar:
        torch.manual_seed(experience_seed(seed, i))
        s, st = runner.train_experience(i, train_exps)
        steps, step_time = steps + s, step_time + st
        torch.manual_seed(experience_seed(seed, i) + 1)
        shown = test_exps if future else test_exps[: i + 1]
        for j, a in enumerate(evaluate_stream(runner.predict, shown, masks, eval_batch_size, device)):
            if not np.isnan(a):
                matrix.record(i, j, a)
        row = matrix.as_array()[i, : i + 1]
        bar.set_postfix(avg_acc=f"{np.nanmean(row):.3f}", steps_per_s=f"{steps / max(step_time, 1e-9):.1f}")
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, {
                "fingerprint": fingerprint(config), "config": json.dumps(config, sort_keys=True, default=str),
                "completed": i + 1, "elapsed": elapsed + time.perf_counter() - t0, "steps": steps,
                "step_time": step_time, "matrix": torch.from_numpy(matrix.as_array()),
                "initial": torch.from_numpy(matrix.initial()), "runner": runner.state_dict()})
    bar.close()
    return StreamResult(
        method=config["method"], engine=config["engine"], scenario=config["scenario"], seed=seed,
        accuracy_matrix=matrix.as_array().tolist(), initial_accuracy=matrix.initial().tolist(),
        wall_time_s=elapsed + time.perf_counter() - t0, train_steps=steps,
        step_time_s=step_time / max(steps, 1), trainable_parameters=runner.trainable_parameters(),
        memory=runner.memory(), config=json.loads(json.dumps(config, default=str)))


def _router(model: nn.Module):
    """The per-task adapter router inside ``model`` (itself, or a text classifier's backbone), if any."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and hasattr(candidate, "add_task"):
            return candidate
    return None


class NativeEngine:
    """The plain torch loop (one experience at a time)."""

    def __init__(self, model, method: ContinualMethod, optimizer, lr, epochs, batch_size, device, criterion, masks,
                 train_exps, seed, sequential=None):
        self.model, self.method, self.name = model, method, method.name
        self.epochs, self.batch_size, self.device = epochs, batch_size, device
        self.criterion, self.masks, self.seed, self.lr = criterion, masks, seed, lr
        self.router = _router(model)
        self.sequential = sequential
        self.prepared = -1  # the experience whose adapter structure is in place
        self.optimizer = None
        self._make_opt = lambda: make_optimizer(optimizer, trainable(model), lr, method)
        if method.owns_loop:
            method.setup(model, train_exps, masks, device, seed)
        elif self.router is None and sequential is None:
            self.optimizer = self._make_opt()

    def prepare(self, i: int, train_exps: list) -> None:
        """Put experience i's adapter in place: route to a new task, or calibrate the next sequential one."""
        if i == self.prepared or (self.router is None and self.sequential is None):
            return
        if self.router is not None:
            if i not in self.router.tasks:
                self.router.add_task(i)
            self.router.set_task(i)
        else:
            self.sequential.before_experience(i, train_exps)
            self.model.to(self.device)
        self.optimizer = self._make_opt()  # the new adapter's tensors
        self.prepared = i

    def train_experience(self, i: int, train_exps: list) -> tuple[int, float]:
        if self.method.owns_loop:
            return self.method.train_experience(self.model, i, train_exps, self.epochs, self.batch_size, self.lr)
        self.prepare(i, train_exps)
        model, opt, method = self.model, self.optimizer, self.method
        set_candidates(model, train_exps, self.masks, seen=i)
        method.before_experience(model, i)
        data = method.train_dataset(i, train_exps)
        loader = shuffled_loader(data, self.batch_size, experience_seed(self.seed, i))
        model.train()
        steps, step_time = 0, 0.0
        for _ in range(self.epochs):
            for batch in loader:
                x, y, t = unpack(batch, self.device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                logits = restrict_logits(model(x), t, self.masks, i)
                loss = self.criterion(logits, y)
                loss.backward()
                method.after_backward()
                opt.step()
                method.after_update()
                step_time += time.perf_counter() - t0
                steps += 1
        method.after_experience(i, train_exps)
        model.eval()
        return steps, step_time

    def predict(self, x: torch.Tensor, t, j: int) -> torch.Tensor:
        if self.method.owns_loop:
            return self.method.predict(self.model, x, j)
        self.model.eval()
        set_candidates(self.model, None, self.masks, task=j)
        if self.router is not None:
            return self.model(x, task_id=j) if j in self.router.tasks else None
        return self.model(x)

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "method": self.method.state_dict(), "prepared": self.prepared}
        if self.router is not None:
            state["tasks"] = list(self.router.tasks)
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict, train_exps: list | None = None) -> None:
        if self.router is not None:  # recreate the adapters of finished experiences before loading their tensors
            for task in state["tasks"]:
                self.prepare(int(task), train_exps)
        elif self.sequential is not None and state["prepared"] >= 0:
            self.prepare(int(state["prepared"]), train_exps)
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        if "optimizer" in state and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def trainable_parameters(self) -> int:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.method.owns_loop:
            n += self.method.extra_trainable_parameters()
        return n

    def memory(self) -> dict:
        return self.method.memory()
