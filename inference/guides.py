"""Guides that are interchangeable for the same model.

* ``amortized``: the model's own encoder (``model.guide``); one network maps every x to
  its q(z | x).
* ``local``: one set of variational parameters per datapoint (Hoffman et al. 2013's local
  variational parameters), built from the model's latent-site shapes by tracing it once and
  indexed by the dataset indices ``idx`` of the minibatch. Mean-field over sites: real
  sites get ``N(loc, scale)``, constrained continuous sites the same pushed through
  ``biject_to(support)``, binary sites ``Bernoulli(logits)``, categorical sites
  ``Categorical(logits)``.
* ``iaf``, ``planar``, ``radial``: the encoder's q(z | x) pushed through an amortized
  normalizing flow (``inference.flow_guides``).

The gap between the two on the same data is the amortization gap (Cremer et al. 2018):
the best local guide's ELBO minus the encoder's ELBO, >= 0 at the optimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor, nn

from inference.flow_guides import STEPS as FLOW_STEPS
from inference.flow_guides import FlowGuide
from models.base import DATA_PLATE, DGMError, GenerativeModel

GUIDES = ("amortized", "local") + tuple(FLOW_STEPS)


@dataclass(frozen=True)
class _Site:
    name: str
    kind: str  # "real" | "constrained" | "bernoulli" | "categorical"
    shape: Tuple[int, ...]  # per-datapoint shape of the parameter
    event_dim: int
    support: object


def _latent_sites(model: GenerativeModel, x: Tensor) -> Dict[str, _Site]:
    n = x.shape[0]
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(model.model).get_trace(x, torch.arange(n, device=x.device), n)
    sites = {}
    for name, site in prune_subsample_sites(trace).nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fn = site["fn"]
        frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
        if not frames:
            raise DGMError(f"latent site {name!r} is outside the data plate; a local guide needs it inside")
        batch = tuple(fn.batch_shape)
        extra = batch[len(batch) + frames[0].dim + 1 :]
        event = tuple(fn.event_shape)
        support = fn.support
        base = support.base_constraint if isinstance(support, constraints.independent) else support
        if base is constraints.real:
            kind, shape = "real", extra + event
        elif base is constraints.boolean:
            kind, shape = "bernoulli", extra + event
        elif isinstance(base, constraints.integer_interval) and base.lower_bound == 0:
            kind, shape = "categorical", extra + event + (int(base.upper_bound) + 1,)
        elif not support.is_discrete and tuple(biject_to(support).inverse_shape(event)) == event:
            kind, shape = "constrained", extra + event
        else:
            raise DGMError(f"local guide: unsupported support {support} at site {name!r}")
        sites[name] = _Site(name, kind, shape, len(event), support)
    if not sites:
        raise DGMError(f"{type(model).__name__} has no latent sites: it needs no guide")
    return sites


class LocalGuide(nn.Module):
    """Per-datapoint variational parameters for a dataset of ``num_data`` rows."""

    def __init__(self, model: GenerativeModel, data: Tensor, init_scale: float = 0.1):
        super().__init__()
        self.num_data = data.shape[0]
        self.sites = _latent_sites(model, data[: min(2, self.num_data)])
        self.loc = nn.ParameterDict()
        self.raw_scale = nn.ParameterDict()
        raw = torch.tensor(init_scale).expm1().log().item()  # softplus^-1
        for name, s in self.sites.items():
            shape = (self.num_data,) + s.shape
            self.loc[name] = nn.Parameter(data.new_zeros(shape))
            if s.kind in ("real", "constrained"):
                self.raw_scale[name] = nn.Parameter(data.new_full(shape, raw))

    def _dist(self, s: _Site, idx: Tensor) -> dist.TorchDistribution:
        loc = self.loc[s.name][idx]
        if s.kind == "bernoulli":
            return dist.Bernoulli(logits=loc).to_event(s.event_dim)
        if s.kind == "categorical":
            return dist.Categorical(logits=loc).to_event(s.event_dim)
        scale = nn.functional.softplus(self.raw_scale[s.name][idx]) + 1e-5
        q = dist.Normal(loc, scale).to_event(s.event_dim)
        if s.kind == "constrained":
            q = dist.TransformedDistribution(q, biject_to(s.support))
        return q

    def forward(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None):
        if idx is None:
            if x.shape[0] != self.num_data:
                raise DGMError(
                    f"a local guide for {self.num_data} datapoints was called on a batch of "
                    f"{x.shape[0]} without dataset indices idx"
                )
            idx = torch.arange(self.num_data, device=x.device)
        with pyro.plate(DATA_PLATE, size or self.num_data, subsample=idx, dim=-1):
            for s in self.sites.values():
                pyro.sample(s.name, self._dist(s, idx))

    @torch.no_grad()
    def init_from(self, guide: Callable, data: Tensor, batch_size: int = 500) -> "LocalGuide":
        """Start at another guide's per-datapoint means and scales (real sites only),
        e.g. the encoder's, so fitting can only improve on it."""
        n = data.shape[0]
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size), device=data.device)
            trace = poutine.trace(guide).get_trace(data[idx], idx, n)
            for name, s in self.sites.items():
                if s.kind != "real" or name not in trace.nodes:
                    continue
                fn = trace.nodes[name]["fn"]
                self.loc[name][idx] = fn.mean.reshape((len(idx),) + s.shape)
                std = fn.stddev.reshape((len(idx),) + s.shape).clamp_min(1e-4)
                self.raw_scale[name][idx] = std + torch.log(-torch.expm1(-std))  # softplus^-1
        return self


def build_guide(
    kind: str, model: GenerativeModel, data: Tensor, *, flow_depth: int = 2, flow_hidden: Optional[int] = None
) -> Tuple[Callable, Optional[nn.Module]]:
    """Return ``(guide_callable, extra_module)``; ``extra_module`` holds parameters the model
    does not (``None`` for the amortized guide, whose encoder is part of the model).

    ``iaf``, ``planar`` and ``radial`` push the encoder's q(z | x) through ``flow_depth``
    amortized flow steps (``inference.flow_guides``) with hidden width ``flow_hidden``
    (default ``max(16, 4 * latent size)``)."""
    if kind == "amortized":
        return model.guide, None
    if kind == "local":
        g = LocalGuide(model, data)
        return g, g
    if kind in FLOW_STEPS:
        g = FlowGuide(model, data, kind, depth=flow_depth, hidden=flow_hidden)
        return g, g
    raise DGMError(f"unknown guide {kind!r}; choose from {', '.join(GUIDES)}")
