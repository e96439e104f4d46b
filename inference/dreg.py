"""Doubly reparameterized IWAE gradients (Tucker, Lawson, Gu and Maddison 2019).

The bound is IWAE's, ``log (1/K) sum_k w_k`` per datapoint, and so is the model's gradient,
``sum_k w~_k d log p(x, z_k) / d theta`` with ``w~_k = w_k / sum_j w_j``. The guide's IWAE
gradient ``sum_k w~_k d log w_k / d phi`` has a score term, ``-sum_k w~_k d log q(z_k) / d phi``
at fixed samples; reparameterizing it a second time (their eq. 5) turns it into a pathwise
term, and the guide's gradient becomes::

    sum_k w~_k^2 [d log w_k / d z_k]_(phi fixed in q) d z_k / d phi

unbiased for the IWAE gradient, with a signal-to-noise ratio that grows with K where IWAE's
falls as ``1 / sqrt(K)`` (Rainforth et al. 2018).

Computation: the log-weights are STL's (``inference.stl.path_log_weights``: the score of the
guide's parameters removed, values unchanged); the surrogate ``sum_k stop(w~_k) log w_k``
gives the model ``sum_k w~_k d log p / d theta`` and every sample ``z_k`` the gradient
``w~_k d log w_k / d z_k``; a gradient hook on each guide sample multiplies what flows back
into the guide by ``w~_k`` once more, so the guide's parameters receive the squared weights,
the model's the plain ones, from one backward pass and one evaluation of the model.

Refused: non-reparameterizable guide sites (no pathwise term), and guides whose sites
condition on other sampled latents (``q(z2 | z1)``): the hook on ``z1`` would also rescale
the gradient that reaches it through ``z2``, and the per-site score removal drops ``z1``'s
route through ``q(z2 | z1)``'s parameters, which DReG's identity needs.

Reference: G. Tucker, D. Lawson, S. Gu and C. J. Maddison, "Doubly reparameterized gradient
estimators for Monte Carlo objectives", ICLR 2019.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from inference.config import ObjectiveConfig
from inference.logweights import LogWeights, _data_dim
from inference.objective import OBJECTIVES
from inference.stl import STL, latent_sites, own_guide_trace, refuse_non_reparameterized
from models.base import DataSpec, DGMError, GenerativeModel


def refuse_hierarchical(trace, what: str) -> None:
    """Refuse a guide one of whose sites' distributions depends on another sampled site."""
    sites = [(name, site) for name, site in latent_sites(trace) if site["value"].requires_grad]
    for name, site in sites:
        log_q = site["fn"].log_prob(site["value"].detach()).sum()
        others = [(n, s) for n, s in sites if n != name]
        if not log_q.requires_grad or not others:
            continue
        grads = torch.autograd.grad(log_q, [s["value"] for _, s in others], allow_unused=True, retain_graph=True)
        for (other, _), g in zip(others, grads):
            if g is not None:
                raise DGMError(
                    f"{what} needs guide sites that do not condition on other sampled latents, but q({name} | ...) "
                    f"depends on {other!r}; use iwae or stl with this guide"
                )


def site_weights(weights: Tensor, site, particle_dim: int) -> Tensor:
    """``weights [K, B]`` shaped to broadcast against the site's value (particles at
    ``particle_dim``, datapoints at the data plate's dim, ones elsewhere and over the event)."""
    value = site["value"]
    batch_dims = value.dim() - len(site["fn"].event_shape)
    if batch_dims < -particle_dim:
        raise DGMError(f"site {site['name']!r} has fewer batch dims than the particle plate needs")
    shape = [1] * value.dim()
    shape[batch_dims + particle_dim] = weights.shape[0]
    shape[batch_dims + _data_dim(site)] = weights.shape[1]
    return weights.reshape(shape)


class DReG(STL):
    """IWAE's bound; the model's IWAE gradient; the guide's doubly reparameterized gradient."""

    name = "dreg"

    def check(self, model: GenerativeModel) -> None:
        trace = own_guide_trace(model)
        refuse_non_reparameterized(trace, self.name)
        refuse_hierarchical(trace, self.name)

    _guide_checked = False  # a guide reaching log_weights without check() (pyro.infer.SVI) is checked once

    def log_weights(self, model: Callable, guide: Optional[Callable], *args, **kwargs) -> LogWeights:
        lw, trace = self.path_log_weights(model, guide, *args, **kwargs)
        if trace is not None:
            if not self._guide_checked:
                refuse_hierarchical(trace, self.name)
                self._guide_checked = True
            w = torch.softmax(lw.log_w.detach(), dim=0)
            particle_dim = -(self.model_plates + 1)
            for _, site in latent_sites(trace):
                if site["value"].requires_grad:
                    site["value"].register_hook(_scale_by(site_weights(w, site, particle_dim)))
        return lw

    def reduce(self, lw: LogWeights) -> Tuple[Tensor, Tensor]:
        bound = self.per_datapoint(lw)
        surrogate = (torch.softmax(lw.log_w.detach(), dim=0) * lw.log_w).sum(0)
        return bound, bound.detach() + (surrogate - surrogate.detach())


def _scale_by(factor: Tensor):
    return lambda grad: grad * factor


@OBJECTIVES.register("dreg", "doubly reparameterized IWAE gradients (--k samples; reparameterizable guides)")
def _dreg(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> DReG:
    return DReG(config.k)
