"""The library's continual methods; each file registers one (``@register_method``)."""

from . import avalanche_only, classp, ewc, gkcl, kcl, lwf, migu, naive, powerlaw, replay  # noqa: F401
