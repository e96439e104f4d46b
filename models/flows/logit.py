"""The logit map of 8-bit images (MAF paper, Papamakarios et al. 2017): a pure function of
tensors, shared by the ``mnist-logit`` data (``experiments.data``) and the flows' bits per
dimension (:func:`models.flows.base.logit_bits_per_dim`).

Pixels are dequantized to ``x = (pixel + u) / 256`` in ``[0, 1]`` and mapped to
``y = logit(lam + (1 - 2 lam) x)``, ``lam = LOGIT_LAMBDA``. A log-density ``log p_y(y)``
fitted in logit space converts to the pixel cube ``[0, 1]^D`` by the change of variables
``log p_x(x) = log p_y(y) + logit_log_jacobian(y)``, where
``logit_log_jacobian(y) = sum_d [log(1 - 2 lam) - log sigmoid(y_d) - log sigmoid(-y_d)]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LOGIT_LAMBDA", "logit_log_jacobian"]

LOGIT_LAMBDA = 1e-6
"""``mnist-logit``: y = logit(lam + (1 - 2 lam) x), as in the MAF paper (Papamakarios et al. 2017)."""


def logit_log_jacobian(y: Tensor, lam: float = LOGIT_LAMBDA) -> Tensor:
    """Per-datapoint ``sum_d log |dy_d / dx_d|`` of ``y = logit(lam + (1 - 2 lam) x)``.

    With ``x`` the dequantized pixels in ``[0, 1]``, ``dy/dx = (1 - 2 lam) / (s (1 - s))``,
    ``s = sigmoid(y)``, so ``log p_x(x) = log p_y(y) + logit_log_jacobian(y)``. Computed from
    ``y`` through log-sigmoids, which stay accurate where ``s`` is within ``lam`` of 0 or 1.
    """
    terms = math.log1p(-2 * lam) - torch.nn.functional.logsigmoid(y) - torch.nn.functional.logsigmoid(-y)
    return terms.flatten(1).sum(-1)
