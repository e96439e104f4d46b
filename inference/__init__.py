"""Fitting and evaluating models; knows nothing about particular models.

Everything reduces the per-datapoint log-weights of ``inference.logweights``:
objectives (``ELBO``, ``ScoreFunctionELBO``, ``IWAE``), estimators of log p(x)
(``exact``, ``naive``, ``is``), and the one training loop (``Runner``).
"""

from inference.estimators import Estimate, estimate_dataset, importance
from inference.guides import LocalGuide, build_guide
from inference.logweights import LogWeights, compute_log_weights
from inference.objectives import ELBO, IWAE, ScoreFunctionELBO, make_objective
from inference.runner import Runner, TrainConfig, fit_local_guide

__all__ = [
    "compute_log_weights",
    "LogWeights",
    "ELBO",
    "ScoreFunctionELBO",
    "IWAE",
    "make_objective",
    "LocalGuide",
    "build_guide",
    "Estimate",
    "estimate_dataset",
    "importance",
    "Runner",
    "TrainConfig",
    "fit_local_guide",
]
