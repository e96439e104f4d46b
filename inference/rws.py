"""Reweighted wake-sleep (Bornschein and Bengio 2015), the wake-wake form of Le et al. 2019.

K samples ``z_k ~ q(z | x)`` per datapoint, drawn without gradient (any latent: discrete
ones included), and their self-normalized weights ``w~_k = w_k / sum_j w_j``:

* wake-theta: the model ascends the IWAE bound, ``sum_k w~_k grad_theta log p(x, z_k)``;
* wake-phi: the guide ascends ``sum_k w~_k log q(z_k | x)``, the self-normalized estimate of
  ``-KL(p(z | x) || q(z | x))``'s gradient (the inclusive KL, mass-covering); its fixed
  point is the exact posterior where the guide's family holds it (then every ``w~_k = 1/K``
  and the expected gradient ``mean_k grad log q(z_k)`` is zero).

Neither update is the gradient of one objective; the surrogate below has the IWAE bound's
value (what is reported and validated) and both updates as its gradient, from one pass::

    stop(bound) + [sum_k stop(w~_k) (log p(x, z_k) + log q(z_k | x))] - stop(same)

(the model's parameters see only ``log p``, the guide's only ``log q``). No sleep phase.

References: J. Bornschein and Y. Bengio, "Reweighted wake-sleep", ICLR 2015; T. A. Le,
A. R. Kosiorek, N. Siddharth, Y. W. Teh and F. Wood, "Revisiting reweighted wake-sleep for
models with stochastic control flow", UAI 2019.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from inference.config import ObjectiveConfig
from inference.logweights import LogWeights
from inference.objective import OBJECTIVES
from inference.objectives import IWAE
from models.base import DataSpec


class RWS(IWAE):
    """Wake-theta on the IWAE bound, wake-phi on the self-normalized weights."""

    force_score_function = True  # samples drawn without gradient: no pathwise term, any latent
    supports_schedule = False
    supports_globals = False
    global_draws = None

    def reduce(self, lw: LogWeights) -> Tuple[Tensor, Tensor]:
        bound = self.per_datapoint(lw)
        w = torch.softmax(lw.log_w.detach(), dim=0)
        wake = (w * (lw.log_lik + lw.log_prior + lw.log_q)).sum(0)
        return bound, bound.detach() + (wake - wake.detach())


@OBJECTIVES.register("rws", "reweighted wake-sleep (wake-theta on IWAE, wake-phi on self-normalized weights; --k)")
def _rws(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> RWS:
    return RWS(config.k)
