"""The library's continual methods, one file each; every module here is imported (and so registers
its method with ``@register_method``) when the package is, so a new method is one new file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
