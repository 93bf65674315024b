"""monoroute: transformers with massively wide, extremely sparse routed FFN layers."""
from monoroute.errors import MonorouteError
from monoroute.hooks import HookPoint, SparseActivations
from monoroute.layers import RoutedFFN
from monoroute.models import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "HookPoint", "MonorouteError", "RoutedFFN", "SparseActivations"]
__version__ = "0.1.0"
