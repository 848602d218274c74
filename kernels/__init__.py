"""Adapter matmuls and covariance ops.

Every op is a ``torch.autograd.Function`` with a hand-written backward for a frozen base and three
backends chosen per call (``backend="auto" | "torch" | "composite" | "triton"``, see
:mod:`lifelong.kernels.dispatch`): plain torch on the CPU, cuBLAS composites or fused Triton
kernels on CUDA, and the Triton kernels under ``TRITON_INTERPRET=1`` for tests. Adapters call only
the names exported here; :mod:`lifelong.kernels.reference` keeps the plain autograd oracles.

Imported under the top-level name ``kernels`` (Python started in the repository root puts the root
on ``sys.path``, and transformers imports the PyPI package ``kernels``), this file hands over to
that installed distribution: it loads the first ``kernels`` found on ``sys.path`` outside the
repository root and puts it in ``sys.modules`` in its place, so ``import kernels`` returns it.
"""

from __future__ import annotations

import sys


def _hand_over() -> None:
    """Replace this module in ``sys.modules`` by the installed PyPI ``kernels`` package."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is "
                                  "lifelong.kernels, not the PyPI package)", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


if __name__ == "kernels":
    _hand_over()
else:
    from .bone import bone_linear
    from .covariance import CovState, cov_accumulate_, cov_finalize, cov_product, cov_update_
    from .dispatch import BACKENDS, use_backend
    from .lamda import lamda_linear
    from .lora import lora_linear
    from .reference import bat_delta, shard_sum
    from .ssf import ssf_linear
    from .subspace import subspace_project

__all__ = [
    "BACKENDS",
    "CovState",
    "bat_delta",
    "bone_linear",
    "cov_accumulate_",
    "cov_finalize",
    "cov_product",
    "cov_update_",
    "lamda_linear",
    "lora_linear",
    "shard_sum",
    "ssf_linear",
    "subspace_project",
    "use_backend",
]
