"""Objectives: score distillation, distribution matching, attribution features."""

from carv.objectives.attribution import GradientFeatures, cosine_scores
from carv.objectives.dmd import DenoisingLoss, DistributionMatching
from carv.objectives.sds import ScoreDistillation, SDSOutput
from carv.objectives.weighting import WEIGHTINGS, weight_table

__all__ = ["GradientFeatures", "cosine_scores",
           "DenoisingLoss", "DistributionMatching", "ScoreDistillation", "SDSOutput", "WEIGHTINGS", "weight_table"]
