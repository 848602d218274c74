"""Adapter matmuls and covariance ops.

Every op is a ``torch.autograd.Function`` with a hand-written backward for a frozen base and three
backends chosen per call (``backend="auto" | "torch" | "composite" | "triton"``, see
:mod:`lifelong.kernels.dispatch`): plain torch on the CPU, cuBLAS composites or fused Triton
kernels on CUDA, and the Triton kernels under ``TRITON_INTERPRET=1`` for tests. Adapters call only
the names exported here; :mod:`lifelong.kernels.reference` keeps the plain autograd oracles.

Imports from outside this folder are absolute (``lifelong.checks``): with the repository root on
``sys.path`` (``python -m pytest`` run there), transformers' check for the Hugging Face ``kernels``
package imports this folder as a top-level ``kernels``, where a ``..`` import would fail.
"""

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
