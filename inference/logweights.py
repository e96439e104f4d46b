"""The one log-weight core every objective and estimator reduces.

Trace the guide once under a particle plate of size K (so K samples are drawn in one
vectorized pass), replay the model against it, and return per-datapoint terms of shape
``[K, B]``::

    log_w[k, b] = log p(x_b, z_kb) - log q(z_kb | x_b)

together with its parts (observed log-likelihood, log prior and log guide density of the
latent sites) and ``log_q_sf``, the guide log-density of every site whose gradient needs a
score-function term (non-reparameterizable sites, or all sites when the caller forces it).

Per-datapoint attribution uses the ``"data"`` plate of the model contract: every site's
log-density is summed over all batch dimensions except the particle dimension and the data
plate's dimension. Minibatch scaling (``N / B``) is returned separately as ``scale`` so
that per-datapoint bounds (IWAE) are computed before scaling, which is where Pyro's
``RenyiELBO`` goes wrong for local latents under subsampled plates (pyro issues 2220, 3104).

Model latent sites the guide does not sample are proposed from the prior, so their prior
log-density cancels and does not enter ``log_w``. With ``guide=None`` every latent site is
proposed from the prior: ``log_w`` is the log-likelihood (the naive Monte Carlo estimator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import kl_divergence

from models.base import DATA_PLATE, DGMError

PARTICLE_PLATE = "particles"


@dataclass
class LogWeights:
    """Per-particle, per-datapoint terms, each ``[K, B]`` (``kl`` is ``None`` unless asked)."""

    log_w: Tensor
    log_lik: Tensor
    log_prior: Tensor
    log_q: Tensor
    log_q_sf: Tensor
    has_sf: bool
    scale: float
    kl: Optional[Tensor] = None  # sum of analytic KL(q || p) over sites that have one
    kl_free_log_ratio: Optional[Tensor] = None  # log p(z) - log q(z) of the other sites

    @property
    def num_particles(self) -> int:
        return self.log_w.shape[0]


class _DetachSamples(Messenger):
    """Draw guide samples detached, so their gradient flows only through score-function
    terms. Sampling happens here, in the process phase after the plates have broadcast the
    distribution, so the trace records (and the model replays) the detached value."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None:
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"]).detach()
            msg["done"] = True


def _per_datapoint(site, log_p: Tensor, particle_dim: int, shape: tuple) -> Tensor:
    """Sum a site's log-density over every batch dim except particles and data: ``[K, B]``."""
    n = -particle_dim
    if log_p.dim() > n:
        raise DGMError(
            f"site {site['name']!r} has {log_p.dim()} batch dims but the particle plate sits at "
            f"dim {particle_dim}; raise the model's max_plate_nesting"
        )
    mask = site["mask"]
    if log_p.shape == shape and n == 2 and mask is None and _data_dim(site) == -1:
        return log_p  # already [K, B]: the common case, no views to build or backpropagate
    if mask is not None and mask is not True:
        log_p = torch.where(mask, log_p, 0.0) if isinstance(mask, Tensor) else log_p * 0.0
    log_p = log_p.reshape((1,) * (n - log_p.dim()) + tuple(log_p.shape))
    data_dim = _data_dim(site)
    if data_dim is None:
        raise DGMError(
            f"site {site['name']!r} is outside the {DATA_PLATE!r} plate; per-datapoint "
            "log-weights need every latent and observed site inside model.data_plate(...)"
        )
    keep = {0, n + data_dim}
    other = [d for d in range(n) if d not in keep]
    if other:
        log_p = log_p.sum(dim=other, keepdim=True)
    return log_p.reshape(log_p.shape[0], log_p.shape[n + data_dim]).expand(shape)


def _sample_sites(trace):
    """``(name, site)`` of the sample sites, without Pyro's subsample bookkeeping sites
    (filtered in place: ``prune_subsample_sites`` copies the trace)."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _data_dim(site) -> Optional[int]:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    return None


def data_frame(trace):
    """The ``"data"`` plate's frame (its ``size`` is the batch, ``full_size`` the dataset)."""
    for _, site in _sample_sites(trace):
        for frame in site["cond_indep_stack"]:
            if frame.name == DATA_PLATE:
                return frame
    raise DGMError(f"the model has no {DATA_PLATE!r} plate; wrap its sites in model.data_plate(...)")


def compute_log_weights(
    model: Callable,
    guide: Optional[Callable],
    args: tuple = (),
    kwargs: Optional[dict] = None,
    *,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    force_score_function: bool = False,
    analytic_kl: bool = False,
) -> LogWeights:
    """Draw ``num_particles`` samples from ``guide`` in one vectorized pass and score them.

    Args:
        model, guide: Pyro programs with the same signature; ``guide=None`` proposes from
            the prior.
        max_plate_nesting: plates the model nests (the data plate counts one); the particle
            plate goes one dim to the left of them.
        force_score_function: detach every guide sample, so guide gradients come only from
            score-function terms (the ``elbo-sf`` objective).
        analytic_kl: also return ``kl``, the closed-form KL(q || p) of latent sites whose
            guide and prior pair has one (and which are reparameterized), and
            ``kl_free_log_ratio`` for the rest; only valid for the mean over particles.
    """
    kwargs = kwargs or {}
    particle_dim = -(max_plate_nesting + 1)

    def particles(fn):
        return pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim)(fn)

    if guide is None:
        guide_trace = None
        model_trace = poutine.trace(particles(model)).get_trace(*args, **kwargs)
    else:
        guide_fn = particles(guide)
        if force_score_function:
            guide_fn = _DetachSamples()(guide_fn)
        guide_trace = poutine.trace(guide_fn).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(*args, **kwargs)
    frame = data_frame(model_trace)
    shape = (num_particles, frame.size)
    lik, prior, q, q_sf, kls, kl_free = [], [], [], [], [], []
    has_sf = False

    guide_sites = {}
    if guide_trace is not None:
        guide_sites = {name: site for name, site in _sample_sites(guide_trace) if not site["is_observed"]}

    for name, site in _sample_sites(model_trace):
        if site["is_observed"]:
            lik.append(_per_datapoint(site, site["fn"].log_prob(site["value"]), particle_dim, shape))
            continue
        if name not in guide_sites:
            continue  # proposed from the prior: log p(z) - log q(z) = 0
        g = guide_sites[name]
        lp = _per_datapoint(site, site["fn"].log_prob(site["value"]), particle_dim, shape)
        lq = _per_datapoint(g, g["fn"].log_prob(g["value"]), particle_dim, shape)
        prior.append(lp)
        q.append(lq)
        sf = force_score_function or not g["fn"].has_rsample
        if sf:
            has_sf = True
            q_sf.append(lq)
        if analytic_kl:
            site_kl = None if sf else _try_kl(g["fn"], site["fn"])
            if site_kl is None:
                kl_free.append(lp - lq)
            else:
                kls.append(_per_datapoint(site, site_kl, particle_dim, shape))

    missing = set(guide_sites) - {n for n, _ in _sample_sites(model_trace)}
    if missing:
        raise DGMError(f"guide samples sites the model does not have: {sorted(missing)}")
    zeros = torch.zeros(shape, device=_any_device(model_trace))

    def total(terms: list) -> Tensor:
        return zeros if not terms else terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)

    log_lik, log_prior, log_q = total(lik), total(prior), total(q)
    return LogWeights(
        log_w=log_lik + (log_prior - log_q) if q else log_lik,
        log_lik=log_lik,
        log_prior=log_prior,
        log_q=log_q,
        log_q_sf=total(q_sf),
        has_sf=has_sf,
        scale=(frame.full_size or frame.size) / frame.size,
        kl=total(kls) if analytic_kl else None,
        kl_free_log_ratio=total(kl_free) if analytic_kl else None,
    )


def _try_kl(q, p) -> Optional[Tensor]:
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def _any_device(trace) -> torch.device:
    for site in trace.nodes.values():
        if site["type"] == "sample" and isinstance(site["value"], Tensor):
            return site["value"].device
    return torch.device("cpu")
