"""Backforward Propagation: update stage 1, recompute, update stage 2 with the gradient that sees it, ..."""

from .cuda_graphs import CapturedStep
from .ics import ICSReport, measure_ics
from .optimizer import Backforward
from .reference import reference_step
from .stages import Stage

__all__ = ["Backforward", "CapturedStep", "ICSReport", "Stage", "measure_ics", "reference_step"]
__version__ = "0.1.0"
