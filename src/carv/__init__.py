"""carv: cheaper Monte Carlo estimates with frozen diffusion teachers, at equal variance.

Layers (DESIGN.md section 3), bottom up: ``schedules``, ``teachers``, ``noise``, ``timesteps``,
``accounting``, ``estimator``, ``objectives``, ``apps`` (pipelines), ``bench`` (benchmark drivers that
measure the apps' pipelines side by side), ``cli``.
"""

from carv import accounting
from carv.accounting import Accountant, Allocator, AutoK, CostMeter, allocate
from carv.estimator import Draws, Estimate, HierarchicalEstimator
from carv.objectives.attribution import GradientFeatures
from carv.objectives.dmd import DistributionMatching
from carv.objectives.sds import ScoreDistillation, SDSOutput
from carv.objectives.weighting import weight_table
from carv.schedules import VPSchedule
from carv.timesteps import LearnedProposal, SecondMomentResampler, TimestepDraws, TimestepSampler

__version__ = "0.1.0"

__all__ = [
    "Accountant",
    "Allocator",
    "AutoK",
    "CostMeter",
    "DistributionMatching",
    "Draws",
    "Estimate",
    "GradientFeatures",
    "HierarchicalEstimator",
    "LearnedProposal",
    "SDSOutput",
    "ScoreDistillation",
    "SecondMomentResampler",
    "TimestepDraws",
    "TimestepSampler",
    "VPSchedule",
    "accounting",
    "allocate",
    "weight_table",
]
