"""Adapter matmuls and covariance ops.

Every op has a plain-torch reference (:mod:`lifelong.kernels.reference`) with the same signature;
fused Triton kernels plug in behind these names (``shared/specs/kernels.md``), so adapters call
only the names exported here.
"""

from .reference import bat_delta, shard_sum
from .reference import bone_linear_ref as bone_linear
from .reference import cov_update_ref as cov_update_
from .reference import lamda_linear_ref as lamda_linear
from .reference import lora_linear_ref as lora_linear
from .reference import ssf_linear_ref as ssf_linear

__all__ = ["bat_delta", "bone_linear", "cov_update_", "lamda_linear", "lora_linear", "shard_sum", "ssf_linear"]
