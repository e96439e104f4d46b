"""KL annealing and free bits: schedules any latent model can train with.

Both act on the KL part of the ELBO, ``log q(z | x) - log p(z)`` (its Monte Carlo estimate,
or the closed form with ``--analytic-kl``), and leave the reconstruction term alone. The
runner calls ``objective.set_step(step)`` once per optimizer step; the objective asks its
``KLSchedule`` for the regularized log-weights (``KLSchedule.regularize``).

* **KL annealing / warm-up** (Bowman et al. 2016; Sønderby et al. 2016): the KL term is
  weighted by ``beta(step) = beta0 + (1 - beta0) * min(1, step / W)``, so the objective is
  ``E_q[log p(x | z)] - beta * KL``, which reaches the ELBO after ``W`` steps. Under IWAE
  the same weight tempers the log-ratio inside every importance weight,
  ``log w = log p(x | z) + beta * (log p(z) - log q(z | x))``.
* **Free bits** (Kingma et al. 2016, IAF paper, eq. 15): the latent units are split into
  groups ``j`` (one group per latent site, or one per dimension); the KL of each group
  averaged over the minibatch (and particles), ``KLbar_j``, is replaced by
  ``max(lambda, KLbar_j)``::

      L = sum_b E_q[log p(x_b | z)] - B * sum_j max(lambda, KLbar_j)

  A group below its floor contributes the constant ``lambda`` and so no gradient: the
  encoder is free to use ``lambda`` nats of it without paying for them. Per datapoint the
  objective keeps a group's own ``KL_jb`` where ``KLbar_j >= lambda`` and puts ``lambda``
  where it is below, which sums to the expression above. It is defined for the ELBO with
  reparameterized guides (the term is a minibatch statistic, not a per-datapoint weight).

The schedule's state (the step) goes into the objective's ``state_dict``, so checkpoints
and resume keep it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import pyro.poutine as poutine
import torch
from torch import Tensor
from torch.distributions import Independent, kl_divergence

from inference.logweights import LogWeights, _per_datapoint, _sample_sites
from models.base import DGMError

FREE_BITS_GROUPS = ("site", "dimension")


@dataclass
class LinearWarmup:
    """``beta(step) = beta0 + (1 - beta0) * min(1, step / steps)``; ``steps = 0`` is beta = 1."""

    beta0: float = 0.0
    steps: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise DGMError(f"--kl-warmup must be >= 0 steps, got {self.steps}")
        if not 0.0 <= self.beta0 <= 1.0:
            raise DGMError(f"--kl-beta0 must lie in [0, 1], got {self.beta0}")

    def __call__(self, step: int) -> float:
        if self.steps == 0 or step >= self.steps:
            return 1.0
        return self.beta0 + (1.0 - self.beta0) * step / self.steps


@dataclass
class FreeBits:
    """Floor ``lam`` nats on each group's minibatch-mean KL; groups are latent sites or
    single dimensions (``per="dimension"``)."""

    lam: float
    per: str = "site"

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise DGMError(f"--free-bits must be >= 0 nats, got {self.lam}")
        if self.per not in FREE_BITS_GROUPS:
            raise DGMError(f"--free-bits-per must be one of {', '.join(FREE_BITS_GROUPS)}, got {self.per!r}")

    def floor(self, kl: Tensor) -> Tensor:
        """``[K, B, G]`` per-group KL -> the same with groups whose mean is below ``lam``
        replaced by the constant ``lam`` (no gradient flows through them)."""
        mean = kl.mean(dim=(0, 1))
        return torch.where(mean >= self.lam, kl, torch.full_like(kl, self.lam))


class KLSchedule:
    """Annealing and/or free bits, with the training step as its state."""

    def __init__(self, warmup: Optional[LinearWarmup] = None, free_bits: Optional[FreeBits] = None):
        self.warmup = warmup or LinearWarmup()
        self.free_bits = free_bits
        self.step = 0

    def __repr__(self) -> str:
        return f"KLSchedule(warmup={self.warmup}, free_bits={self.free_bits}, step={self.step})"

    @property
    def per_dimension(self) -> bool:
        return self.free_bits is not None and self.free_bits.per == "dimension"

    def set_step(self, step: int) -> None:
        self.step = int(step)

    @property
    def beta(self) -> float:
        return self.warmup(self.step)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def regularize(self, lw: LogWeights, groups: Dict[str, Tensor]) -> LogWeights:
        """Log-weights whose KL part is annealed and floored; ``groups`` maps each latent
        site to its ``[K, B, G]`` KL contributions (``kl_groups``). With ``beta = 1`` and no
        free bits ``lw`` comes back unchanged: the objective is exactly the plain one."""
        beta = self.beta
        if self.free_bits is None:
            if beta == 1.0:
                return lw
            ratio = lw.log_prior - lw.log_q if lw.kl is None else lw.kl_free_log_ratio - lw.kl
            log_w = lw.log_lik + beta * ratio
        else:
            if lw.has_sf:
                raise DGMError("free bits need reparameterized guide sites; use annealing alone with this model")
            kl = sum(self.free_bits.floor(g).sum(-1) for g in groups.values())
            log_w = lw.log_lik - beta * kl
        return replace(lw, log_w=log_w, kl=None, kl_free_log_ratio=None)


# --- per-site, per-dimension KL terms ------------------------------------------------------------
def recording(model: Callable, guide: Callable) -> Tuple[Callable, Callable, Callable]:
    """Wrap ``model`` and ``guide`` so that the traces the objective builds of them are kept;
    returns ``(model, guide, traces)`` with ``traces() -> (model_trace, guide_trace)``."""
    model_rec, guide_rec = poutine.trace(model), poutine.trace(guide)
    return model_rec, guide_rec, lambda: (model_rec.msngr.trace, guide_rec.msngr.trace)


def kl_groups(
    model_trace, guide_trace, shape: Tuple[int, int], *, per_dimension: bool, analytic: bool, max_plate_nesting: int
) -> Dict[str, Tensor]:
    """``{site: [K, B, G]}``: each latent site's KL contribution per particle and
    datapoint, one column per group (``G = 1``, or the site's event size when
    ``per_dimension``): ``log q(z) - log p(z)``, or ``KL(q || p)`` in closed form when
    ``analytic`` and one exists. Summed over groups and sites it is the ELBO's KL term."""
    particle_dim = -(max_plate_nesting + 1)
    guide_sites = {name: site for name, site in _sample_sites(guide_trace) if not site["is_observed"]}
    out = {}
    for name, site in _sample_sites(model_trace):
        if site["is_observed"] or name not in guide_sites:
            continue
        g = guide_sites[name]
        per_group = _per_group_kl(g["fn"], site["fn"], g["value"], per_dimension, analytic)
        columns = [_per_datapoint(site, c, particle_dim, shape) for c in per_group.unbind(-1)]
        out[name] = torch.stack(columns, dim=-1)
    return out


def _per_group_kl(q, p, z: Tensor, per_dimension: bool, analytic: bool) -> Tensor:
    """``[*batch, G]`` KL terms of one site (``G = 1`` unless ``per_dimension``)."""
    if per_dimension:
        q, p, event_dims = _unwrap(q), _unwrap(p), len(q.event_shape)
    if analytic:
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            kl = None
        if kl is not None:
            return kl.reshape(kl.shape[: kl.dim() - event_dims] + (-1,)) if per_dimension else kl.unsqueeze(-1)
    kl = q.log_prob(z) - p.log_prob(z)
    return kl.reshape(kl.shape[: kl.dim() - event_dims] + (-1,)) if per_dimension else kl.unsqueeze(-1)


def _unwrap(d):
    """The per-dimension distribution under ``to_event`` (``Independent`` layers)."""
    while isinstance(d, Independent):
        d = d.base_dist
    if d.event_shape:
        raise DGMError(f"free bits per dimension need factorized latent sites, not {type(d).__name__}")
    return d


def make_schedule(
    warmup_steps: int = 0, beta0: float = 0.0, free_bits: float = 0.0, free_bits_per: str = "site"
) -> Optional[KLSchedule]:
    """The schedule of the ``dgm train`` flags, or ``None`` when they ask for none
    (``--kl-warmup 0`` and ``--free-bits 0``: the plain objective)."""
    warmup = LinearWarmup(beta0, warmup_steps)
    bits = FreeBits(free_bits, free_bits_per)
    if warmup_steps == 0 and free_bits == 0.0:
        return None
    return KLSchedule(warmup, bits if free_bits > 0 else None)
