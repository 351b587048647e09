"""Accuracy-budgeted mixed precision: find the units INT8 hurts, keep only those high.

``metric`` (``AccuracyBudget``: what must hold), ``search`` (the search and its driver,
``find_units_to_keep_high``; the final check, ``check_final``), ``rewrite`` (the graphs it
measures), ``cache`` (its measurements on disk) and ``report`` (``BudgetReport``).
docs/precision.md describes the search.
"""

from .cache import MeasurementCache, analysis_key, default_cache_dir
from .metric import METRICS, AccuracyBudget, BatchOutputs, UserMetric
from .report import BudgetReport
from .rewrite import SwitchedInt8, build_int8, keep_high, quantized_units
from .search import FinalModule, check_final, find_units_to_keep_high, search

__all__ = [
    "METRICS",
    "AccuracyBudget",
    "BatchOutputs",
    "BudgetReport",
    "FinalModule",
    "MeasurementCache",
    "SwitchedInt8",
    "UserMetric",
    "analysis_key",
    "build_int8",
    "check_final",
    "default_cache_dir",
    "find_units_to_keep_high",
    "keep_high",
    "quantized_units",
    "search",
]
