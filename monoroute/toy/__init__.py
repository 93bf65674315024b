"""Toy models with known ground-truth features: superposition, unit monosemanticity, feature recovery.

Each experiment is a pure function `run_<exp>(config) -> dict`; `monoroute toy <exp>` wraps it.
"""
from monoroute.toy.abs_task import AbsConfig, run_abs
from monoroute.toy.recovery import RecoveryConfig, run_recovery
from monoroute.toy.tms import TMSConfig, run_tms

__all__ = ["AbsConfig", "RecoveryConfig", "TMSConfig", "run_abs", "run_recovery", "run_tms"]
