"""Sticking the landing (Roeder, Wu and Duvenaud 2017): the ELBO (``--k 1``) and IWAE
(``--k K``) with the score of the guide's parameters removed from the guide's gradient.

With a reparameterized sample ``z = z(eps; phi)`` the total gradient of
``log w = log p(x, z) - log q(z | x; phi)`` is a pathwise term plus a score term::

    d log w / d phi = [d log w / d z] dz / d phi  -  [d log q(z | x; phi) / d phi]_(z fixed)

The score term has mean zero under q, so dropping it leaves the ELBO's gradient unbiased,
and the estimator left has zero variance where q is the exact posterior (``log w`` is then
constant in z). It is computed once, for every objective that needs it (here and in
``inference.dreg``), by :func:`path_log_weights`::

    log w_path = log w + [log q(stop(z) | x; phi) - stop(log q(stop(z) | x; phi))]

which has the value of ``log w`` and the gradient of ``log p(x, z) - log q(z | x; stop(phi))``:
the second term is zero, with exactly the score term as its gradient. Model parameters get
the same gradient as without it.

With K > 1 the guide's gradient ``sum_k w~_k [pathwise term]_k`` is *biased*: the IWAE score
term ``sum_k w~_k d log q(z_k) / d phi`` does not have mean zero (Tucker et al. 2019, sec. 3);
``dreg`` is the unbiased form. The bound, its value and the model's gradient are IWAE's.

Each guide site's score is taken at its own distribution's parameters; for a hierarchical
guide (``q(z2 | z1)``) that also drops ``z1``'s route through ``q(z2 | z1)``'s parameters, a
term of mean zero too, so the ELBO gradient stays unbiased (but no longer sticks the
landing). Non-reparameterizable guide sites have no pathwise term: ``stl`` refuses them.

References: G. Roeder, Y. Wu and D. Duvenaud, "Sticking the landing: simple, lower-variance
gradient estimators for variational inference", NeurIPS 2017; G. Tucker, D. Lawson, S. Gu
and C. J. Maddison, "Doubly reparameterized gradient estimators for Monte Carlo objectives",
ICLR 2019.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import pyro.poutine as poutine
import torch
from torch import Tensor

from inference.config import ObjectiveConfig
from inference.logweights import LogWeights, _per_datapoint, _sample_sites
from inference.objective import OBJECTIVES
from inference.objectives import IWAE
from models.base import DataSpec, DGMError, GenerativeModel, collect_aux_terms


def own_guide_trace(model: GenerativeModel):
    """A trace of the model's own guide on two all-zero datapoints (labels 0 where the model
    takes labels), with gradients on and the caller's random stream untouched: what an
    objective's ``check`` inspects before training."""
    x = model.data_spec.placeholder(2).to(device=model.device, dtype=model.dtype)
    kwargs = {"y": torch.zeros(2, dtype=torch.long, device=model.device)} if model.uses_labels else {}
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), poutine.block(), collect_aux_terms(train=False):
        with torch.enable_grad():
            return poutine.trace(model.guide).get_trace(x, **kwargs)


def latent_sites(trace):
    """``(name, site)`` of the latent sample sites of a guide trace."""
    return [(name, site) for name, site in _sample_sites(trace) if not site["is_observed"]]


def refuse_non_reparameterized(trace, what: str) -> None:
    """One-line refusal of the first guide site without a pathwise gradient."""
    for name, site in latent_sites(trace):
        if not site["fn"].has_rsample:
            raise DGMError(
                f"{what} needs reparameterizable guide sites, but site {name!r} ({_family(site['fn'])}) is not; "
                "use vimco, rws or elbo-sf for discrete latents"
            )


def _family(fn) -> str:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return type(fn).__name__


def params_score(trace, particle_dim: int, shape: Tuple[int, int], what: str) -> Tensor:
    """``sum_sites [log q(stop(z)) - stop(log q(stop(z)))]`` per particle and datapoint
    ``[K, B]``: zero, with the gradient of the guide's parameters at fixed samples."""
    refuse_non_reparameterized(trace, what)
    total = None
    for _, site in latent_sites(trace):
        try:
            log_q = site["fn"].log_prob(site["value"].detach())
        except DGMError as e:  # a flow without an inverse (planar, radial)
            raise DGMError(f"{what} evaluates the guide's density at detached samples, but {e}") from None
        log_q = _per_datapoint(site, log_q, particle_dim, shape)
        term = log_q - log_q.detach()
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


class STL(IWAE):
    """IWAE's bound (the ELBO for K = 1) with the guide's gradient through the samples only
    (module docstring)."""

    supports_schedule = False
    supports_globals = False
    global_draws = None
    name = "stl"

    def check(self, model: GenerativeModel) -> None:
        refuse_non_reparameterized(own_guide_trace(model), self.name)

    def path_log_weights(self, model: Callable, guide: Optional[Callable], *args, **kwargs):
        """``(log-weights with log w_path and log q_path, the guide's own trace)``; without
        gradients (evaluation) the plain log-weights and ``None``."""
        if guide is None or not torch.is_grad_enabled():
            return super().log_weights(model, guide, *args, **kwargs), None
        traced = poutine.trace(guide)  # inside the particle plate: the sites as broadcast and drawn
        lw = super().log_weights(model, traced, *args, **kwargs)
        score = params_score(traced.trace, -(self.model_plates + 1), tuple(lw.log_w.shape), self.name)
        return replace(lw, log_w=lw.log_w + score, log_q=lw.log_q - score), traced.trace

    def log_weights(self, model: Callable, guide: Optional[Callable], *args, **kwargs) -> LogWeights:
        return self.path_log_weights(model, guide, *args, **kwargs)[0]


@OBJECTIVES.register("stl", "sticking the landing: ELBO (K = 1) or IWAE (--k) without the guide's score term")
def _stl(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> STL:
    return STL(config.k)
