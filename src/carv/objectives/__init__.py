"""Objectives: score distillation, distribution matching, attribution features."""

from carv.objectives.sds import ScoreDistillation, SDSOutput
from carv.objectives.weighting import WEIGHTINGS, weight_table

__all__ = ["ScoreDistillation", "SDSOutput", "WEIGHTINGS", "weight_table"]
