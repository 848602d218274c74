"""The ``lifelong`` command.

    lifelong run CONFIG.yaml [--output DIR] [--resume | --overwrite] [key=value ...]
    lifelong adapters MODEL        trainable parameters of every registered adapter on MODEL
    lifelong bench NAME [ARGS...]  run benchmarks/NAME.py from the source checkout
"""

from __future__ import annotations

import argparse
import copy
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

BUILTIN_MODELS = ("minilm", "tiny-llama")
BENCHMARKS_DIR = Path(__file__).resolve().parent / "benchmarks"


def load_model(spec: str) -> tuple[nn.Module, list[Any]]:
    """A built-in example model or a local Hugging Face folder, with a few sample batches."""
    from . import models

    if spec == "minilm" or (spec not in BUILTIN_MODELS and Path(spec).is_dir()):
        from transformers import AutoModel, AutoTokenizer

        folder = models.minilm_path() if spec == "minilm" else Path(spec)
        model = AutoModel.from_pretrained(folder).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            batch = dict(tokenizer(["lifelong adapters", "a second sample sentence"], padding=True, return_tensors="pt"))
        except (OSError, ValueError):
            batch = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 8))}
        return model, [batch]
    if spec == "tiny-llama":
        return models.tiny_llama(), [{"input_ids": torch.randint(0, 128, (2, 8))}]
    raise SystemExit(
        f"lifelong adapters: {spec!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a local folder"
    )


def adapter_table(model: nn.Module, batches: list[Any]) -> list[tuple[str, str, str]]:
    import lifelong as ll
    from lifelong.adapters import get_method

    rows = []
    total = sum(p.numel() for p in model.parameters())
    for name in ll.available():
        adapter_cls = get_method(name).adapter_cls
        if not any(isinstance(m, adapter_cls.layer_types) for m in model.modules()):
            rows.append((name, "-", "no supported layer"))
            continue
        fresh = copy.deepcopy(model)
        try:
            adapted = ll.wrap(fresh, name, **adapter_cls.example_options(fresh, batches))
        except ValueError as err:
            rows.append((name, "-", str(err).split(";")[0]))
            continue
        trainable = adapted.get_nb_trainable_parameters()[0]
        rows.append((name, f"{trainable:,d}", f"{100 * trainable / total:.3f}%"))
    return rows


def cmd_adapters(args: argparse.Namespace) -> int:
    model, batches = load_model(args.model)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {total:,d} parameters; adapters at their default settings\n")
    rows = adapter_table(model, batches)
    width = max(len(r[0]) for r in rows)
    print(f"{'adapter':<{width}}  {'trainable':>12}  share")
    for name, count, share in rows:
        print(f"{name:<{width}}  {count:>12}  {share}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    available = sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py")) if BENCHMARKS_DIR.is_dir() else []
    if not available:
        raise SystemExit("lifelong bench: the benchmarks/ folder ships with the source checkout, not the wheel")
    if args.name not in available:
        raise SystemExit(f"lifelong bench: unknown benchmark {args.name!r}; available: {', '.join(available)}")
    sys.argv = [str(BENCHMARKS_DIR / f"{args.name}.py"), *args.args]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lifelong run: warning: {message}", file=sys.stderr)


def interrupted(output: Path | None) -> str:
    """What Ctrl-C kept, and how to go on."""
    if output is None:
        return "lifelong run: interrupted before the run started; nothing was written"
    cells = output / "cells"
    done = len([p for p in cells.glob("*.json") if not p.name.startswith(".")]) if cells.is_dir() else 0
    return (f"lifelong run: interrupted; {done} finished cell(s) are kept in {str(cells)!r}, and a cell that was "
            "running resumes from its last checkpoint there; run the same command with --resume to continue")


def cmd_run(args: argparse.Namespace) -> int:
    from .experiment import ConfigError, load_config, run_experiment

    output = None
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning  # one line per warning, no source location
        # Avalanche's evaluator warns when it has no loggers; lifelong logs and reports itself
        warnings.filterwarnings("ignore", message="No loggers specified", category=UserWarning)
        try:
            config = load_config(args.config, args.overrides)
            output = Path(args.output or Path("runs") / config["name"])
            run_experiment(config, output, resume=args.resume, overwrite=args.overwrite)
        except KeyboardInterrupt:
            print(interrupted(output), file=sys.stderr)
            return 130
        except ConfigError as err:
            print(f"lifelong run: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # e.g. the disk filled up during the run
            where = f" on {str(err.filename)!r}" if err.filename else ""
            print(f"lifelong run: {err.strerror or err}{where}; finished cells are kept, "
                  "rerun with --resume once the problem is fixed", file=sys.stderr)
            return 1
    print(f"\nreport: {Path(output) / 'report.md'}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"run": cmd_run, "adapters": cmd_adapters, "bench": cmd_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lifelong", description="continual learning with adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run an experiment from a YAML config and write a report")
    p.add_argument("config", help="YAML file (see examples/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.lr=0.1")
    p.add_argument("--output", type=Path, help="output folder (default: runs/<name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    mode.add_argument("--overwrite", action="store_true", help="replace the results in --output")
    p = sub.add_parser("adapters", help="list the adapters with their trainable parameters on a model")
    p.add_argument("model", help=f"a local Hugging Face model folder or one of: {', '.join(BUILTIN_MODELS)}")
    p = sub.add_parser("bench", help="run a script from benchmarks/")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`run c.yaml --output o a.b=1`): argparse leaves them over.
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if args.command != "run" and overrides or len(overrides) != len(extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":
        args.overrides = [*args.overrides, *overrides]
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
