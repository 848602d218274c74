"""The library's continual methods; each file registers one (``@register_method``)."""

from . import (avalanche_only, classp, ewc, gkcl, joint, kcl, lwf, migu, naive, olora, per_task_finetune,  # noqa: F401
               powerlaw, replay)
