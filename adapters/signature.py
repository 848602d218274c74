"""Give an adapted model its base model's ``forward`` signature.

Tools that read the signature of ``type(model).forward`` must see the base model's arguments, not
the wrapper's ``*args, **kwargs``: the Hugging Face Trainer keeps only the dataset columns that
signature names and takes its label names (hence ``eval_loss``) from it. :func:`signature_class`
returns, per (wrapper class, base class), one cached subclass of the wrapper whose ``forward``
carries the base's signature plus the wrapper's own keyword-only arguments (e.g. ``task_id``).
Its name keeps the base class name, which the Trainer also reads (question-answering labels).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def plain_class(cls: type) -> type:
    """The wrapper class a signature class was made from (the class itself otherwise)."""
    return cls.__dict__.get("_plain_class", cls)


def base_signature(wrapper_cls: type, base_cls: type) -> inspect.Signature | None:
    """The base's ``forward`` signature (with ``self``) plus the wrapper's keyword-only arguments;
    None when the base's forward cannot be inspected (a builtin or C extension)."""
    try:
        base = inspect.signature(base_cls.forward)
        own = inspect.signature(wrapper_cls.forward)
    except (TypeError, ValueError):
        return None
    params = list(base.parameters.values())
    names = {p.name for p in params}
    extra = [p for p in own.parameters.values() if p.kind is p.KEYWORD_ONLY and p.name not in names]
    var_kw = [i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD]
    at = var_kw[0] if var_kw else len(params)
    # Positional parameters with defaults may not follow one without: keyword-only has no such rule.
    return base.replace(parameters=params[:at] + extra + params[at:])


def signature_class(wrapper_cls: type, base_cls: type) -> type:
    """A subclass of ``wrapper_cls`` whose ``forward`` shows the signature of ``base_cls.forward``."""
    wrapper_cls = plain_class(wrapper_cls)
    key = (wrapper_cls, base_cls)
    if key not in _CLASSES:
        signature = base_signature(wrapper_cls, base_cls)
        if signature is None:
            _CLASSES[key] = wrapper_cls
        else:
            plain_forward = wrapper_cls.forward

            def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
                return plain_forward(self, *args, **kwargs)

            forward.__signature__ = signature  # type: ignore[attr-defined]
            forward.__doc__ = plain_forward.__doc__
            forward.__wrapped_base__ = base_cls.forward  # type: ignore[attr-defined]
            name = f"{wrapper_cls.__name__}[{base_cls.__name__}]"
            _CLASSES[key] = type(name, (wrapper_cls,), {
                "forward": forward, "_plain_class": wrapper_cls, "__module__": wrapper_cls.__module__,
                "__qualname__": name, "__doc__": wrapper_cls.__doc__,
            })
    return _CLASSES[key]


def rebuild(wrapper_cls: type, base_cls: type) -> nn.Module:
    """An empty adapted model of the right class; pickle and deepcopy then set its state
    (see ``AdaptedModel.__reduce_ex__``: signature classes are made at run time, so pickle
    cannot find them by name)."""
    cls = signature_class(wrapper_cls, base_cls)
    return cls.__new__(cls)
