"""Guides that are interchangeable for the same model: one interface, one registry.

Every guide is a :class:`Guide`: an ``nn.Module`` whose call is the Pyro guide program
``guide(x, idx=None, size=None, **conditions)``, whose parameters are the ones it holds
beyond the model's (none for the model's own encoder), and which declares its policy:

* ``refit_on_new_data``: its parameters belong to the training datapoints, so held-out
  data needs a guide fitted afresh (``for_data`` does it, with the model frozen);
* ``is_model_guide``: it is the model's own guide (it receives the model's label keyword,
  and objectives that fit the model alone accept it).

The runner and the experiments read these declarations; they never compare guide names.
Guides are registered in ``GUIDES`` with a factory ``(GuideConfig, model, data) -> Guide``.

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
from typing import Callable, ClassVar, Dict, Optional, Tuple, Union

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor, nn

from inference.config import GuideConfig
from models.base import DATA_PLATE, DGMError, GenerativeModel, IndexedPlate
from models.registry import Registry

LOCAL_STEP_SIZE = 0.3
"""The local guide's per-minibatch natural-gradient step size (``before_step``)."""

GUIDES = Registry("guide")
"""Guide name -> factory ``(config: GuideConfig, model, data: Tensor) -> Guide``."""


class Guide(nn.Module):
    """Base class of every guide (see the module docstring)."""

    refit_on_new_data: ClassVar[bool] = False
    is_model_guide: ClassVar[bool] = False
    config: Optional[GuideConfig] = None  # what it was built from (build_guide records it)
    lr: Optional[float] = None  # its parameters' own learning rate (None: the run's --lr), scaled by the schedule

    def describe(self) -> str:
        """The guide as a run summary names it."""
        return type(self).__name__

    def for_data(self, model: GenerativeModel, x: Tensor, *, num_particles: int = 1, train=None) -> "Guide":
        """A guide for the (held-out) data ``x``: this one, unless ``refit_on_new_data``."""
        return self

    def before_step(self, model: GenerativeModel, x: Tensor, idx: Tensor, size: int, conditions: dict) -> None:
        """Called by the runner before each training step on the minibatch ``x`` (rows
        ``idx`` of ``size``): a guide may update its own parameters here (the local guide
        fits the minibatch's rows). Default: nothing."""


@GUIDES.register("amortized", "the model's own encoder q(z | x), shared by every datapoint")
class AmortizedGuide(Guide):
    """The model's own guide (``model.guide``). It holds no parameters of its own: the
    encoder is part of the model, trained and checkpointed with it."""

    is_model_guide = True

    def __init__(self, config: Optional[GuideConfig] = None, model: Optional[GenerativeModel] = None, data=None):
        super().__init__()
        if model is None:
            raise DGMError("the amortized guide needs the model whose encoder it is")
        self._program = model.guide  # a bound method: the model is not registered as a submodule

    def forward(self, *args, **kwargs):
        return self._program(*args, **kwargs)

    def describe(self) -> str:
        return "amortized"


@dataclass(frozen=True)
class _Site:
    name: str
    kind: str  # "real" | "constrained" | "bernoulli" | "categorical"
    shape: Tuple[int, ...]  # per-datapoint shape of the parameter
    event_dim: int
    support: object


def site_error(guide: str, name: str, fn, why: str, instead: str) -> DGMError:
    """The one-line refusal of a guide that cannot handle a site: which site, which
    distribution, why, and which guide to use instead."""
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist  # name the distribution itself, not its reshaping wrappers
    return DGMError(f"the {guide} guide cannot handle site {name!r} ({type(fn).__name__}: {why}); use {instead}")


def plain_support(support):
    """``support`` as ``biject_to`` knows it: a mixture's (``MixtureSameFamily``) is its
    components' support, which torch wraps in a constraint of its own."""
    mixture = getattr(torch.distributions.constraints, "MixtureSameFamilyConstraint", None)
    while mixture is not None and isinstance(support, mixture):
        support = support.base_constraint
    return support


def _bijects(support, event: Tuple[int, ...]) -> bool:
    """Whether ``biject_to(support)`` exists and keeps the event shape."""
    try:
        return tuple(biject_to(support).inverse_shape(event)) == event
    except NotImplementedError:
        return False


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
            raise site_error("local", name, fn, "a global latent outside the 'data' plate", "--guide amortized")
        batch = tuple(fn.batch_shape)
        extra = batch[len(batch) + frames[0].dim + 1 :]
        event = tuple(fn.event_shape)
        support = plain_support(fn.support)
        base = support.base_constraint if isinstance(support, constraints.independent) else support
        if base is constraints.real:
            kind, shape = "real", extra + event
        elif base is constraints.boolean:
            kind, shape = "bernoulli", extra + event
        elif isinstance(base, constraints.integer_interval) and base.lower_bound == 0:
            kind, shape = "categorical", extra + event + (int(base.upper_bound) + 1,)
        elif not support.is_discrete and _bijects(support, event):
            kind, shape = "constrained", extra + event
        else:
            raise site_error("local", name, fn, f"support {support}", "--guide amortized (the model's own encoder)")
        sites[name] = _Site(name, kind, shape, len(event), support)
    if not sites:
        raise DGMError(f"{type(model).__name__} has no latent sites: it needs no guide")
    return sites


INIT_SAMPLES = 1000  # samples whose moments start a local guide at a flow's q


def _moments(fn) -> Tuple[Tensor, Tensor]:
    """``(mean, stddev)`` of a guide site's distribution: closed forms where it has them,
    else those of ``INIT_SAMPLES`` samples (a flow)."""
    try:
        return fn.mean, fn.stddev
    except NotImplementedError:
        with torch.no_grad():
            z = fn.sample((INIT_SAMPLES,))
        return z.mean(0), z.std(0)


class LocalGuide(Guide):
    """Per-datapoint variational parameters for a dataset of ``num_data`` rows."""

    refit_on_new_data = True

    def __init__(
        self,
        model: GenerativeModel,
        data: Tensor,
        init_scale: float = 1.0,
        refit_epochs: int = 100,
        lr: Optional[float] = None,
        steps: int = 0,
    ):
        super().__init__()
        self.refit_epochs, self.init_scale, self.lr, self.steps = refit_epochs, init_scale, lr, steps
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
        with IndexedPlate(DATA_PLATE, size or self.num_data, dim=-1, subsample=idx):
            for s in self.sites.values():
                pyro.sample(s.name, self._dist(s, idx))

    @torch.no_grad()
    def init_from(self, guide: Callable, data: Tensor, batch_size: int = 500) -> "LocalGuide":
        """Start at another guide's per-datapoint means and scales (real sites only),
        e.g. the encoder's, so fitting can only improve on it. A distribution without a
        closed-form mean (a flow's) is matched by the moments of ``INIT_SAMPLES`` samples."""
        n = data.shape[0]
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size), device=data.device)
            trace = poutine.trace(guide).get_trace(data[idx], idx, n)
            for name, s in self.sites.items():
                if s.kind != "real" or name not in trace.nodes:
                    continue
                mean, std = _moments(trace.nodes[name]["fn"])
                self.loc[name][idx] = mean.reshape((len(idx),) + s.shape)
                std = std.reshape((len(idx),) + s.shape).clamp_min(1e-4)
                self.raw_scale[name][idx] = std + torch.log(-torch.expm1(-std))  # softplus^-1
        return self

    def describe(self) -> str:
        return "local"

    def before_step(self, model: GenerativeModel, x: Tensor, idx: Tensor, size: int, conditions: dict) -> None:
        """Stochastic variational inference's local step (Hoffman et al. 2013): ``steps``
        natural-gradient steps (``inference.semi_amortized.natural_gradient_steps``, size
        ``LOCAL_STEP_SIZE``) on the ELBO of the minibatch's rows, the model fixed, before the
        joint step. Without it each row's q moves once an epoch and the decoder learns against
        stale posteriors. Only for models whose latent sites are all real-valued."""
        sites = list(self.sites.values())
        if not self.steps or any(s.kind != "real" or len(s.shape) != s.event_dim for s in sites):
            return
        from inference.semi_amortized import natural_gradient_steps  # it imports this module

        params = {
            s.name: (self.loc[s.name][idx], (nn.functional.softplus(self.raw_scale[s.name][idx]) + 1e-5).log())
            for s in sites
        }
        refined, _, _ = natural_gradient_steps(
            model, sites, params, x, idx, size, conditions, self.steps, LOCAL_STEP_SIZE
        )
        with torch.no_grad():
            for name, (loc, log_scale) in refined.items():
                self.loc[name][idx] = loc
                scale = (log_scale.exp() - 1e-5).clamp_min(1e-6)
                self.raw_scale[name][idx] = scale + torch.log(-torch.expm1(-scale))  # softplus^-1

    def for_data(self, model: GenerativeModel, x: Tensor, *, num_particles: int = 1, train=None) -> "LocalGuide":
        """A fresh local guide fitted on ``x`` with the model frozen: ``refit_epochs`` epochs
        of the ELBO with ``num_particles`` samples, the optimizer settings of ``train`` at this
        guide's learning rate (decayed to 0 over the fit), no minibatch steps (their constant
        step size would leave its noise in the fitted q)."""
        from inference.runner import fit_local_guide  # the runner builds guides: import at use

        options = {"local_init_scale": self.init_scale, "local_lr": self.lr, "local_steps": 0}
        return fit_local_guide(model, x, num_particles, train, epochs=self.refit_epochs, guide_options=options)


@GUIDES.register("local", "one set of variational parameters per datapoint, refitted on held-out data")
def _local(config: GuideConfig, model: GenerativeModel, data: Tensor) -> LocalGuide:
    return LocalGuide(
        model,
        data,
        init_scale=config.local_init_scale,
        refit_epochs=config.refit_epochs,
        lr=config.local_lr,
        steps=config.local_steps,
    )


def build_guide(config: Union[GuideConfig, str], model: GenerativeModel, data: Tensor, **settings) -> Guide:
    """The guide ``config`` names (a :class:`GuideConfig`, or a registered name with its
    settings as keywords: ``build_guide("iaf", model, x, flow_depth=4)``) for ``model``,
    sized on ``data`` (the training set)."""
    if isinstance(config, str):
        config = GuideConfig(name=config, **settings)
    config.check()
    factory = GUIDES.get(config.name).factory
    declares_model_guide = isinstance(factory, type) and issubclass(factory, Guide) and factory.is_model_guide
    if model.uses_labels and not declares_model_guide:  # refused before tracing the model without labels
        raise DGMError(
            f"{type(model).__name__} takes class labels and only its own (amortized) guide receives them; "
            f"use --guide amortized instead of {config.name}"
        )
    guide = factory(config, model, data)
    guide.config = config  # a run directory records it
    return guide
