"""VIMCO: the multi-sample bound with leave-one-out baselines (Mnih and Rezende 2016).

The bound is IWAE's, ``L = log (1/K) sum_k w_k`` per datapoint. A non-reparameterizable
guide site's score-function term ``sum_k L * grad log q(z_k)`` (IWAE's) gets a per-sample
baseline that does not depend on ``z_k``: ``L`` with ``w_k`` replaced by the geometric mean
of the other samples' weights (their eq. 9)::

    L_-k = log (1/K) [ sum_(j != k) w_j + exp( 1/(K-1) sum_(j != k) log w_j ) ]

    grad = sum_k (L - L_-k) grad log q(z_k) + sum_k w~_k grad log w_k

so the estimator stays unbiased (``E[L_-k grad log q(z_k)] = 0``) and each sample is credited
only with what it adds to the bound. Reparameterizable sites keep their pathwise gradient
(the second sum, as IWAE). Needs K >= 2.

Reference: A. Mnih and D. J. Rezende, "Variational inference for Monte Carlo objectives",
ICML 2016.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from inference.config import ConfigError, ObjectiveConfig
from inference.logweights import LogWeights
from inference.objective import OBJECTIVES
from inference.objectives import IWAE
from models.base import DataSpec


def leave_one_out_bounds(log_w: Tensor) -> Tensor:
    """``L_-k [K, B]``: the bound with ``log w_k`` replaced by the mean of the others'."""
    k = log_w.shape[0]
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # [K, B]
    own = torch.eye(k, dtype=torch.bool, device=log_w.device).unsqueeze(-1)  # [k, j, 1]
    table = torch.where(own, others_mean.unsqueeze(1), log_w.unsqueeze(0))  # [k, j, B]: row k is sample set k
    return torch.logsumexp(table, dim=1) - math.log(k)


class VIMCO(IWAE):
    """IWAE's bound; leave-one-out baselines for the score-function terms."""

    supports_schedule = False
    supports_globals = False
    global_draws = None

    def __init__(self, num_particles: int = 2, **kwargs):
        if isinstance(num_particles, int) and num_particles < 2:
            raise ConfigError(f"vimco needs --k >= 2 (its baselines leave one sample out), got {num_particles}")
        super().__init__(num_particles, **kwargs)

    def learning_signal(self, lw: LogWeights, bound: Tensor) -> Tensor:
        log_w = lw.log_w.detach()
        return bound.detach() - leave_one_out_bounds(log_w)


@OBJECTIVES.register("vimco", "multi-sample bound with leave-one-out baselines for discrete latents (--k >= 2)")
def _vimco(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> VIMCO:
    return VIMCO(config.k)
