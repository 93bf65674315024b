"""Routed layers: the RoutedFFN, its routers, and the unit-compute primitives.

Importing this package registers the fast unit-compute implementations: "cpu" always, "triton"
when triton imports (it runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1).
"""
from monoroute.layers import cpu_kernels  # noqa: F401  (registers impl "cpu")
from monoroute.layers.compute import available_impls, sampled_dot, weighted_gather_sum
from monoroute.layers.routed_ffn import RoutedFFN
from monoroute.layers.routing import DenseRouter, ProductKeyRouter, Routing

try:
    from monoroute.layers import triton_kernels  # noqa: F401  (registers impl "triton")
except ImportError:  # no triton: the CPU and reference paths are unaffected
    pass

__all__ = [
    "RoutedFFN", "DenseRouter", "ProductKeyRouter", "Routing", "sampled_dot", "weighted_gather_sum", "available_impls"
]
