"""Semi-amortized guide (Kim et al. 2018, SA-VAE): the encoder's q(z | x) refined per datapoint.

For each batch the guide is called on, the encoder gives every real latent site a diagonal
Gaussian ``q(z | x; lambda_0)``, ``lambda_0 = (loc, log scale) = enc(x)``; ``N`` gradient
steps on that datapoint's ELBO (one reparameterized sample per step, the model's parameters
untouched) refine it by natural-gradient ascent::

    loc       <- loc       + lr * clip(scale^2 * grad_loc ELBO)
    log scale <- log scale + lr * clip(grad_{log scale} ELBO / 2)

each gradient averaged over ``REFINE_PARTICLES`` reparameterized samples, the step of each
datapoint clipped to norm ``MAX_STEP_NORM``; the guide then samples ``q(z | x; lambda_N)``.
The preconditioner is the inverse Fisher information of the Gaussian (``scale^2`` for the
mean, ``1/2`` for the log scale), so ``lr`` needs no rescaling with the posterior's width: for
a Gaussian posterior ``lr = 1`` moves the mean to the posterior mean in one step (plain
gradient steps, Kim et al.'s SGD, diverge on narrow posteriors unless ``lr < scale^2``).
This happens wherever the guide is called: in training, in validation and in every
estimator that proposes from a guide, so the held-out evaluation uses the refined q too.

Variant built: **no backpropagation through the refinement** (Kim et al.'s "VAE + SVI"
stage-wise variant, not the full SA-VAE that differentiates through the N steps).
``lambda_N`` is detached, so the objective (ELBO, IWAE, ...) evaluated at the refined q
trains the decoder only; the encoder is trained on the ELBO at its own output
``lambda_0``: the guide adds an auxiliary loss of value zero whose gradient is
``-(N_data / B) sum_b grad_lambda ELBO_b(lambda_0) . d lambda_0 / d phi`` (the first
refinement step's gradient, so it costs nothing extra). With ``--refine-steps 0`` the guide
samples the encoder's own q and the total gradient has the ELBO's expectation.

The family: mean-field diagonal Gaussian over the encoder's real-valued sites, started at the
encoder's per-site mean and standard deviation (for a hierarchical encoder, those given one
encoder sample of the sites above). Models whose encoder has discrete or non-Gaussian latent
sites are refused at construction.

Implementation note: the refinement is an inner Pyro program run while the caller's program
(the objective's particle plate, its trace) is active; it runs with Pyro's handler stack and
plate dimensions set aside (:func:`isolated`), so the caller sees only the guide's final
sample statements.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine import runtime
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from inference.config import GuideConfig
from inference.guides import GUIDES, Guide
from inference.logweights import compute_log_weights
from models.base import DGMError, GenerativeModel, collect_aux_terms

__all__ = ["SemiAmortizedGuide", "isolated", "natural_gradient_steps", "gaussian_elbo", "REFINE_PARTICLES"]

REFINE_PARTICLES = 8  # samples per refinement step: single-sample steps jitter q by more than they gain
MAX_STEP_NORM = 5.0
MIN_SCALE = 1e-4


@contextmanager
def isolated():
    """Run a Pyro program as if no other were running: the handler stack and the plate
    dimension allocator are set aside and restored afterwards, so an inner program (the
    refinement) neither sees the caller's plates and traces nor collides with their names."""
    stack, dims = runtime._PYRO_STACK[:], runtime._DIM_ALLOCATOR._stack[:]
    runtime._PYRO_STACK.clear()
    runtime._DIM_ALLOCATOR._stack.clear()
    try:
        yield
    finally:
        runtime._PYRO_STACK[:] = stack
        runtime._DIM_ALLOCATOR._stack[:] = dims


@dataclass
class _Site:
    name: str
    event_dim: int


def _is_normal(fn) -> bool:
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return isinstance(fn, dist.Normal)


def _real(fn) -> bool:
    support = fn.support
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    return base is constraints.real


class SemiAmortizedGuide(Guide):
    """The model's encoder refined by ``steps`` gradient steps of size ``lr`` per datapoint
    (see the module docstring). Holds no parameters of its own."""

    def __init__(self, model: GenerativeModel, data: Tensor, steps: int = 5, lr: float = 0.1):
        super().__init__()
        if steps < 0:
            raise DGMError(f"--refine-steps must be >= 0, got {steps}")
        if not lr > 0:
            raise DGMError(f"--refine-lr must be > 0, got {lr}")
        self.__dict__["_model"] = model  # not a submodule: the encoder is the model's
        self.steps, self.lr = steps, lr
        self.sites = self._check_sites(data[: min(2, data.shape[0])])

    def _check_sites(self, x: Tensor) -> List[_Site]:
        n = x.shape[0]
        with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=[]):
            trace = poutine.trace(self._model.guide).get_trace(x, torch.arange(n, device=x.device), n)
        sites = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if not (_real(site["fn"]) and _is_normal(site["fn"]) and len(site["fn"].batch_shape) == 1):
                raise DGMError(
                    f"the semi-amortized guide refines diagonal Gaussian sites; {type(self._model).__name__}'s "
                    f"encoder samples {name!r} from {type(site['fn']).__name__}: use --guide amortized or local"
                )
            sites.append(_Site(name, len(site["fn"].event_shape)))
        if not sites:
            raise DGMError(f"{type(self._model).__name__} has no latent sites: it needs no guide")
        return sites

    # --- the refinement ---------------------------------------------------------------------
    def encoder_params(self, x: Tensor, idx, size, conditions) -> Dict[str, Tuple[Tensor, Tensor]]:
        """``{site: (loc, log scale)}`` of the encoder's q(z | x) (with the encoder's graph)."""
        with isolated(), poutine.block():
            trace = poutine.trace(self._model.guide).get_trace(x, idx, size, **conditions)
        out = {}
        for s in self.sites:
            fn = trace.nodes[s.name]["fn"]
            out[s.name] = (fn.mean, fn.stddev.clamp_min(MIN_SCALE).log())
        return out

    def refine(self, x: Tensor, idx=None, size=None, **conditions):
        """``(refined params, encoder params, ELBO gradient at the encoder's params, ELBO
        estimates along the way)``: ``steps`` steps from the encoder's output; the refined
        params are detached."""
        with torch.enable_grad():
            start = self.encoder_params(x, idx, size, conditions)
        refined, first_grad, elbos = natural_gradient_steps(
            self._model, self.sites, start, x, idx, size, conditions, self.steps, self.lr
        )
        return refined, start, first_grad, elbos

    # --- the guide program ------------------------------------------------------------------
    def forward(self, x: Tensor, idx: Optional[Tensor] = None, size: Optional[int] = None, **conditions):
        train_encoder = torch.is_grad_enabled()
        refined, start, grad, elbos = self.refine(x, idx, size, **conditions)
        if train_encoder:
            # the encoder's ELBO gradient, as a loss of value zero (see the module docstring)
            surrogate = 0.0
            for name, pair in start.items():
                for t, g in zip(pair, grad[name]):
                    surrogate = surrogate + (g * t).reshape(t.shape[0], -1).sum(-1)
            self._model.add_aux_loss("encoder_elbo", -(surrogate - surrogate.detach()))
        self._model.add_metric("refine_gain", (elbos[-1] - elbos[0]).mean())
        with self._model.data_plate(x, idx, size):
            for s in self.sites:
                loc, log_scale = refined[s.name]
                pyro.sample(s.name, dist.Normal(loc, log_scale.exp()).to_event(s.event_dim))

    def describe(self) -> str:
        return f"semi-amortized ({self.steps} steps, lr {self.lr:g})"


def gaussian_program(model: GenerativeModel, sites, params: Dict[str, Tuple[Tensor, Tensor]]):
    """The Pyro program sampling each site ``s`` of ``sites`` (with ``name`` and
    ``event_dim``) from ``N(loc, exp(log_scale))``, ``params[s.name] = (loc, log_scale)``,
    inside the model's data plate."""

    def q(x, idx=None, size=None, **conditions):
        with model.data_plate(x, idx, size):
            for s in sites:
                loc, log_scale = params[s.name]
                pyro.sample(s.name, dist.Normal(loc, log_scale.exp()).to_event(s.event_dim))

    return q


def gaussian_elbo(model: GenerativeModel, sites, params, x: Tensor, idx, size, conditions, particles: int) -> Tensor:
    """The ELBO per datapoint ``[B]`` of :func:`gaussian_program` with ``params``, estimated
    with ``particles`` reparameterized samples (differentiable in ``params``), run apart from
    any program the caller is in (:func:`isolated`)."""
    kwargs = {"idx": idx, "size": size, **conditions}
    with isolated(), collect_aux_terms(train=False):
        lw = compute_log_weights(
            model.model,
            gaussian_program(model, sites, params),
            (x,),
            kwargs,
            num_particles=particles,
            max_plate_nesting=model.max_plate_nesting,
        )
    return lw.log_w.mean(0)


def natural_gradient_steps(
    model: GenerativeModel,
    sites,
    params: Dict[str, Tuple[Tensor, Tensor]],
    x: Tensor,
    idx,
    size,
    conditions,
    steps: int,
    lr: float,
    particles: int = REFINE_PARTICLES,
):
    """``steps`` natural-gradient ascent steps on each datapoint's ELBO from the diagonal
    Gaussians ``params`` (``{site: (loc [B, ...], log_scale)}``, see the module docstring),
    the model's parameters untouched. Returns ``(refined params (detached), the gradient at
    the start, the ELBO estimates at each evaluated point)``; with ``steps = 0`` the params
    are returned as they were, with their gradient."""
    params = {name: tuple(t.detach() for t in pair) for name, pair in params.items()}
    first_grad, elbos = None, []
    with torch.enable_grad():
        for step in range(max(steps, 1)):
            leaves = {name: tuple(t.requires_grad_(True) for t in pair) for name, pair in params.items()}
            elbo = gaussian_elbo(model, sites, leaves, x, idx, size, conditions, particles)
            flat = [t for pair in leaves.values() for t in pair]
            grads = iter(torch.autograd.grad(elbo.sum(), flat))
            grad = {name: (next(grads), next(grads)) for name in leaves}
            elbos.append(elbo.detach())
            if first_grad is None:
                first_grad = grad
            if step >= steps:
                break
            natural = []
            for name, (loc, log_scale) in params.items():
                g_loc, g_log_scale = grad[name]
                natural += [(2 * log_scale.detach()).exp() * g_loc, 0.5 * g_log_scale]
            it = iter(_clip_per_datapoint(natural, MAX_STEP_NORM))
            params = {name: tuple((t.detach() + lr * next(it)).detach() for t in pair) for name, pair in params.items()}
    return {name: tuple(t.detach() for t in pair) for name, pair in params.items()}, first_grad, elbos


def _clip_per_datapoint(grads, max_norm: float):
    """Scale each datapoint's gradient (row ``b`` of every tensor) to norm <= ``max_norm``."""
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(-1) for g in grads)
    factor = (max_norm / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)
    return tuple(g * factor.reshape((-1,) + (1,) * (g.dim() - 1)) for g in grads)


@GUIDES.register(
    "semi-amortized",
    "the encoder's q(z | x) refined by --refine-steps gradient steps per datapoint (SA-VAE, no backprop through them)",
)
def _semi_amortized(config: GuideConfig, model: GenerativeModel, data: Tensor) -> SemiAmortizedGuide:
    return SemiAmortizedGuide(model, data, steps=config.refine_steps, lr=config.refine_lr)
