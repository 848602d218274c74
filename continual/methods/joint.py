"""Joint (multi-task) training: the union of every experience, trained at once — the upper bound.

Continual-learning papers report it as "MTL" (O-LoRA, Table 1) or "joint": the model sees all
tasks together, so nothing can be forgotten. In a stream run the whole union is trained during
experience 0 (``epochs`` passes over the concatenated training sets, shuffled together); the later
experiences train nothing, so every row of the accuracy matrix is the one jointly trained model
(forgetting 0, ACC = its mean accuracy).
"""

from __future__ import annotations

from torch.utils.data import ConcatDataset, Subset

from ..hooks import Context, ContinualMethod
from ..registry import register_method
from ..streams import experience_classes

__all__ = ["Joint"]


@register_method("joint", shards=True, engines=("native", "trainer"), adapter_modes=("none", "shared"),
                 combines=False)
class Joint(ContinualMethod):
    """Train once on the union of all experiences (see the module docstring)."""

    def before_experience(self, ctx: Context) -> None:
        if ctx.experience == 0 and hasattr(ctx.model, "candidates"):  # a verbalizer scores every class
            ctx.model.candidates = sorted({c for e in ctx.experiences for c in experience_classes(e)})

    def train_dataset(self, ctx: Context):
        if ctx.experience == 0:
            return ConcatDataset([e.dataset for e in ctx.experiences])
        return Subset(ctx.dataset, [])
