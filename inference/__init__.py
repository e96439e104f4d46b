"""Fitting and evaluating models; knows nothing about particular models.

Everything reduces the per-datapoint log-weights of ``inference.logweights``. Each kind of
part has one interface and one registry:

* objectives: ``inference.objective.Objective``, registered in ``OBJECTIVES``
  (``elbo``, ``elbo-sf``, ``iwae`` in ``objectives``; ``elbo-enum`` in ``enum``; ``em``;
  ``renyi``, ``vimco``, ``stl``, ``dreg``, ``rws``, each in its own module);
* guides: ``inference.guides.Guide``, registered in ``GUIDES`` (``amortized``, ``local``;
  ``iaf``, ``planar``, ``radial`` in ``flow_guides``; ``auto-normal``, ``auto-lowrank-mvn``,
  ``auto-iaf`` (Pyro's autoguides) in ``autoguides``);
* estimators: ``inference.estimators.Estimator``, registered in ``ESTIMATORS``
  (``exact``, ``naive``, ``is``, ``nested``; ``ais`` in ``ais``);

and one training loop (``Runner``) and one evaluation (``evaluate``) consume them.
``set_seed(seed)`` before building a model makes a Python run reproducible.
Importing this package registers every part.
"""

# Each of these modules registers its parts; their order is the order `dgm list` shows.
# isort: off
from inference import objectives, enum, em, flow_guides, ais, semi_amortized, renyi, vimco, stl, dreg, rws  # noqa: F401
from inference import autoguides  # noqa: F401

# isort: on
from inference.config import EvalConfig, GuideConfig, ObjectiveConfig, TrainConfig
from inference.estimators import ESTIMATORS, Estimate, Estimator, estimate_dataset, importance, make_estimator
from inference.evaluation import evaluate
from inference.guides import GUIDES, Guide, LocalGuide, build_guide
from inference.logweights import LogWeights, compute_log_weights
from inference.objective import OBJECTIVES, Objective, make_objective
from inference.objectives import ELBO, IWAE, ScoreFunctionELBO
from inference.runner import Runner, fit_local_guide
from inference.seeding import set_seed

__all__ = [
    "compute_log_weights",
    "LogWeights",
    "Objective",
    "OBJECTIVES",
    "ObjectiveConfig",
    "ELBO",
    "ScoreFunctionELBO",
    "IWAE",
    "make_objective",
    "Guide",
    "GUIDES",
    "GuideConfig",
    "LocalGuide",
    "build_guide",
    "Estimator",
    "ESTIMATORS",
    "Estimate",
    "estimate_dataset",
    "make_estimator",
    "importance",
    "evaluate",
    "EvalConfig",
    "Runner",
    "TrainConfig",
    "fit_local_guide",
    "set_seed",
]
