"""A real text stream that every Python install carries: standard-library docstrings by area.

Each task is one area of the standard library; its classes are that area's modules, and each
sample is the first paragraph of the docstring of one public function, class or method of the
module (``"Return the square root of x."`` → ``math``). The text is real English written by the
Python developers, it needs no download, and telling ``math`` from ``statistics`` from ``random``
is a genuine, learnable task for a pretrained encoder. Docstrings differ between Python versions,
so the stream (and its fingerprint) is fixed per install, not across installs.

A docstring that appears in two modules (inherited or re-exported) is dropped from both, so no
text carries two labels. Under ``python -OO`` (docstrings stripped) the stream cannot be built
and says so.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Sequence

import numpy as np

from .text import TextStream, _build

__all__ = ["stdlib_stream", "AREAS"]

AREAS: dict[str, list[str]] = {
    "numbers": ["math", "statistics", "random"],
    "files": ["pathlib", "shutil", "tempfile"],
    "time": ["datetime", "calendar", "time"],
    "network": ["socket", "http.client", "email.message"],
    "text": ["re", "difflib", "textwrap"],
    "data": ["collections", "itertools", "heapq"],
}
DEFAULT_AREAS = ("numbers", "files", "time", "network")
MIN_CHARS = 20


def _first_paragraph(obj) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    return text if len(text) >= MIN_CHARS else None


def module_docstrings(name: str) -> list[str]:
    """First paragraphs of the docstrings of ``name``'s public functions, classes and their methods."""
    module = importlib.import_module(name)
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    found: dict[str, None] = {}
    for attr in sorted(public):
        obj = getattr(module, attr, None)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", "") == "builtins":
            continue
        members = [obj] + ([v for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
                           if inspect.isclass(obj) else [])
        for member in members:
            text = _first_paragraph(member)
            if text is not None:
                found.setdefault(text, None)
    return list(found)


def stdlib_stream(areas: Sequence[str] = DEFAULT_AREAS, per_class: int | None = 40, test_fraction: float = 0.3,
                  seed: int = 0, task_incremental: bool = True) -> TextStream:
    """One task per standard-library area (default: numbers, files, time, network), 3 modules each.

    Args:
        areas: names of :data:`AREAS`, in stream order.
        per_class: docstrings kept per module (seeded; None keeps all).
        test_fraction: share of each module's docstrings held out for testing (stratified).
    """
    unknown = [a for a in areas if a not in AREAS]
    if unknown or not areas:
        raise ValueError(f"stdlib_stream: unknown or no areas {unknown or list(areas)}; valid: {', '.join(AREAS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"stdlib_stream: test_fraction must be in (0, 1), got {test_fraction!r}")
    docs = {m: module_docstrings(m) for a in areas for m in AREAS[a]}
    counts: dict[str, int] = {}
    for texts in docs.values():
        for text in texts:
            counts[text] = counts.get(text, 0) + 1
    raw = []
    for i, area in enumerate(areas):
        rng = np.random.default_rng([seed, i])
        train, test = [], []
        for module in AREAS[area]:
            texts = [t for t in docs[module] if counts[t] == 1]
            if len(texts) < 4:
                raise ValueError(f"stdlib_stream: module {module!r} has {len(texts)} usable docstrings "
                                 "(docstrings stripped by python -OO?); at least 4 are needed")
            texts = [texts[k] for k in rng.permutation(len(texts))[:per_class]]
            n_test = max(1, int(round(test_fraction * len(texts))))
            test += [(t, module) for t in texts[:n_test]]
            train += [(t, module) for t in texts[n_test:]]
        raw.append((area, list(AREAS[area]), train, test))
    return _build(raw, task_incremental, share_labels=False,
                  metadata={"source": "stdlib", "areas": list(areas), "seed": seed, "per_class": per_class})
