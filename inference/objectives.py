"""Training objectives: one log-weight computation, different reductions.

Every objective computes ``LogWeights`` (``inference.logweights``) and overrides one hook,
``reduce``, which turns the ``[K, B]`` log-weights into a per-datapoint bound ``[B]`` and a
surrogate with the same value whose gradient is the estimator's gradient (pathwise terms
plus score-function terms of non-reparameterized sites). The loss is
``-(N / B) * sum_b surrogate_b``.

* ``ELBO``: ``mean_k log w`` (Kingma & Welling 2014); ``analytic_kl=True`` replaces
  ``log p(z) - log q(z)`` by ``-KL(q || p)`` where a closed form exists.
* ``ScoreFunctionELBO``: the same bound, with every guide sample detached so guide
  gradients come from the score function ``(log w - b) * grad log q`` only (Williams 1992;
  Mnih & Gregor 2014 for the baselines). Baselines: a decaying average of the learning
  signal, plus an optional neural baseline ``b(x)`` fitted by least squares.
* ``IWAE``: ``logsumexp_k log w - log K`` per datapoint (Burda et al. 2016); for K = 1 it
  is the ELBO. Equal to Pyro's ``RenyiELBO(alpha=0)`` for a batch of one datapoint; for
  larger batches Pyro sums the batch before the logsumexp, a looser joint bound.

They implement ``inference.objective.Objective`` (the runner's one interface) and subclass
``pyro.infer.ELBO``, so ``pyro.infer.SVI(model, guide, optim, IWAE(K))`` works too; each is
registered in ``OBJECTIVES`` under the name ``dgm train --objective`` takes.

A ``KLSchedule`` (``inference.schedules``: KL annealing, free bits) attached with
``set_schedule`` changes the training loss only: ``loss_terms`` then optimizes the
regularized log-weights, still reports the true bound, and adds ``beta`` and each site's
KL (``kl/SITE``) to its terms; the runner advances it with ``set_step``. Without a schedule
nothing of this runs.

Global latent sites (outside the data plate; ``LogWeights.global_log_ratio``). The loss is
``-[(N / B) sum_b surrogate_b + G]``, ``G`` the objective's global term, counted once per
step as in Pyro's ``Trace_ELBO``:

* ``ELBO`` (and ``ScoreFunctionELBO``): each particle draws its own globals ``theta_k ~
  q(theta)``, ``G = mean_k [log p(theta_k) - log q(theta_k)]``; loss and gradients equal
  ``Trace_ELBO``'s (tested). Score-function global sites get the learning signal of their
  whole particle, ``(N / B) sum_b log w_kb + G_k`` (no baseline).
* ``IWAE``: one global draw ``theta ~ q(theta)`` per step shared by the K particles, K local
  samples per datapoint given it: ``E_q(theta)[log p(theta) / q(theta) + sum_n IWAE_K(x_n |
  theta)] <= ELBO_theta <= log p(X)``, IWAE in the local latents and an ELBO in the global
  ones; it is ``log p(X)`` exactly when both guides are exact posteriors. (Drawing theta per
  particle inside the logsumexp gives no bound: it tends to ``sum_n log E_q(theta) p(x_n |
  theta)``, which can exceed ``log p(X)``.)

An objective sets ``supports_globals`` to say it has a global term; the others refuse a
model with global sites (``LogWeights.refuse_globals``). ``per_datapoint`` and the
validation bound stay local: the bound of each datapoint given globals drawn from the guide.
The reported training ``bound`` is ``mean_b bound_b + G / N`` (the minibatch estimate of the
bound on ``log p(X) / N``), and ``global_kl`` is ``-G``.

Model auxiliary losses (``GenerativeModel.add_aux_loss``, e.g. VQ-VAE's commitment loss) are
collected around each evaluation of the pair (``models.base.collect_aux_terms``): each adds
``(N / B) * sum_b value_b`` to the training loss and its mean to the terms as ``aux/NAME``;
model metrics (``add_metric``) join the terms as they are. The bound never includes them.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import pyro
import pyro.infer
import torch
from torch import Tensor, nn

from inference.config import ObjectiveConfig
from inference.logweights import LogWeights, compute_log_weights
from inference.objective import OBJECTIVES, Objective, Terms, check_particles, guess_plates
from inference.schedules import KLSchedule, kl_groups, recording
from models.base import AuxTerms, DataSpec, DGMError, collect_aux_terms


class LogWeightObjective(Objective, pyro.infer.ELBO):
    """Base class: subclasses override ``reduce`` (and optionally ``aux_loss``)."""

    force_score_function = False
    analytic_kl = False
    schedule: Optional[KLSchedule] = None
    supports_globals = False  # has a global term (global_objective) for sites outside the data plate
    global_draws: Optional[int] = None  # draws of the global sites per step (None: one per particle)

    def __init__(self, num_particles: int = 1, max_plate_nesting: Optional[int] = None):
        check_particles(num_particles)
        super().__init__(num_particles=num_particles, vectorize_particles=True)
        self.model_plates = max_plate_nesting

    # --- the hooks -------------------------------------------------------------------
    def per_datapoint(self, lw: LogWeights) -> Tensor:
        """The bound per datapoint ``[B]`` (differentiable through reparameterized sites)."""
        raise NotImplementedError

    def learning_signal(self, lw: LogWeights, bound: Tensor) -> Tensor:
        """``[K, B]`` weights of the score-function terms ``grad log q(z_kb | x_b)``."""
        raise NotImplementedError

    def aux_loss(self, lw: LogWeights, args: tuple, train: bool) -> Optional[Tensor]:
        """A loss for auxiliary parameters (baselines); added with zero value."""
        return None

    def global_objective(self, lw: LogWeights, bound: Tensor) -> Tuple[Tensor, Tensor]:
        """``(G, surrogate)``: the global term counted once per step (a scalar) and a
        surrogate with its value and gradient; only called when ``lw`` has global sites."""
        lw.refuse_globals(type(self).__name__)

    def reduce(self, lw: LogWeights) -> Tuple[Tensor, Tensor]:
        """``(bound [B], surrogate [B])``: the surrogate has the bound's value and the
        estimator's gradient (pathwise plus score-function terms)."""
        bound = self.per_datapoint(lw)
        if not lw.has_sf:
            return bound, bound
        sf = (self.learning_signal(lw, bound).detach() * lw.log_q_sf).sum(0)
        return bound, bound + (sf - sf.detach())

    # --- shared machinery -------------------------------------------------------------
    def log_weights(self, model: Callable, guide: Optional[Callable], *args, **kwargs) -> LogWeights:
        if self.model_plates is None:
            self.model_plates = guess_plates(model, guide, args, kwargs)
        lw = compute_log_weights(
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            max_plate_nesting=self.model_plates,
            force_score_function=self.force_score_function,
            analytic_kl=self.analytic_kl,
            global_draws=self.global_draws,
        )
        if not self.supports_globals:
            lw.refuse_globals(type(self).__name__)
        return lw

    def loss_terms(self, model, guide, *args, train: bool = True, **kwargs) -> Tuple[Tensor, Terms]:
        """Differentiable loss and detached per-term means (per datapoint, in nats)."""
        with collect_aux_terms(train) as extra:
            if self.schedule is not None:
                return self._scheduled_loss_terms(model, guide, args, kwargs, train, extra)
            lw = self.log_weights(model, guide, *args, **kwargs)
        bound, surrogate = self.reduce(lw)
        return self._loss(lw, bound, surrogate, args, train, extra=extra)

    def _loss(
        self,
        lw: LogWeights,
        bound: Tensor,
        surrogate: Tensor,
        args: tuple,
        train: bool,
        trained=None,
        extra: Optional[AuxTerms] = None,
    ):
        """The loss of ``surrogate`` and the terms of ``lw``; auxiliary losses fit the
        log-weights being ``trained`` (``lw`` unless a schedule regularizes them); the
        model's own auxiliary losses and metrics come in ``extra``."""
        loss = -lw.scale * surrogate.sum()
        aux = self.aux_loss(lw if trained is None else trained, args, train)
        if aux is not None:
            loss = loss + (aux - aux.detach())
        kl = lw.log_q - lw.log_prior if lw.kl is None else lw.kl - lw.kl_free_log_ratio
        terms = {
            "bound": bound.detach().mean(),
            "recon": -lw.log_lik.detach().mean(),
            "kl": kl.detach().mean(),
        }
        if lw.has_globals:  # counted once per step; per datapoint its share 1 / N
            value, global_surrogate = self.global_objective(lw, bound)
            loss = loss - global_surrogate
            num_data = lw.scale * bound.shape[-1]
            terms["bound"] = terms["bound"] + value.detach() / num_data
            terms["global_kl"] = -value.detach()
        if extra is not None:
            for name, value in extra.losses.items():
                per_datapoint = value.reshape(-1, value.shape[-1]).mean(0)
                loss = loss + lw.scale * per_datapoint.sum()
                terms[f"aux/{name}"] = per_datapoint.detach().mean()
            terms.update(extra.metrics)
        return loss, terms

    # --- schedules (KL annealing, free bits) --------------------------------------------
    def set_schedule(self, schedule: Optional[KLSchedule]) -> "LogWeightObjective":
        if schedule is not None and schedule.free_bits is not None and not self.supports_free_bits:
            raise DGMError(f"free bits are defined for the ELBO, not {type(self).__name__}; use --objective elbo")
        self.schedule = schedule
        return self

    def set_step(self, step: int) -> None:
        """Called by the runner once per optimizer step, before the step's loss."""
        if self.schedule is not None:
            self.schedule.set_step(step)

    def _scheduled_loss_terms(self, model, guide, args: tuple, kwargs: dict, train: bool, extra=None):
        if guide is None:
            raise DGMError("KL annealing and free bits need a guide (the model has latent sites to regularize)")
        model, guide, traces = recording(model, guide)
        lw = self.log_weights(model, guide, *args, **kwargs)
        lw.refuse_globals("KL annealing and free bits", "no --kl-warmup / --free-bits with this model")
        groups = kl_groups(
            *traces(),
            tuple(lw.log_w.shape),
            per_dimension=self.schedule.per_dimension,
            analytic=self.analytic_kl,
            max_plate_nesting=self.model_plates,
        )
        trained = self.schedule.regularize(lw, groups)
        _, surrogate = self.reduce(trained)
        loss, terms = self._loss(lw, self.per_datapoint(lw), surrogate, args, train, trained, extra)
        terms["beta"] = lw.log_w.new_tensor(self.schedule.beta)
        terms.update({f"kl/{name}": g.detach().sum(-1).mean() for name, g in groups.items()})
        return loss, terms

    def bound(self, model, guide, *args, **kwargs) -> Tensor:
        """The per-datapoint bound ``[B]`` without gradients (for evaluation)."""
        with torch.no_grad():
            return self.per_datapoint(self.log_weights(model, guide, *args, **kwargs))

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("log-weight objectives build their own traces")

    # --- auxiliary state (the schedule) for checkpoints ----------------------------------
    def state_dict(self) -> dict:
        return {} if self.schedule is None else {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is not None and "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])


class ELBO(LogWeightObjective):
    """Evidence lower bound ``E_q[log p(x, z) - log q(z | x)]`` averaged over K particles.

    Non-reparameterizable guide sites get the plain score-function term with the
    per-datapoint learning signal (no baseline); use ``ScoreFunctionELBO`` for baselines.
    """

    supports_free_bits = True
    supports_globals = True

    def __init__(self, num_particles: int = 1, analytic_kl: bool = False, **kwargs):
        super().__init__(num_particles, **kwargs)
        self.analytic_kl = analytic_kl

    def per_datapoint(self, lw: LogWeights) -> Tensor:
        per_particle = lw.log_w if lw.kl is None else lw.log_lik + lw.kl_free_log_ratio - lw.kl
        return per_particle.mean(0)

    def reduce(self, lw: LogWeights) -> Tuple[Tensor, Tensor]:
        bound, surrogate = super().reduce(lw)
        if lw.has_sf:
            # For the ELBO, E_q[grad log q(z)] = 0: drop the direct gradient of -log q at
            # score-function sites, as Pyro's TraceGraph_ELBO does (not so for IWAE, where
            # the same term is weighted by the normalized weights and has non-zero mean).
            direct = lw.log_q_sf.mean(0)
            surrogate = surrogate + (direct - direct.detach())
        return bound, surrogate

    def learning_signal(self, lw: LogWeights, bound: Tensor) -> Tensor:
        return lw.log_w / lw.num_particles

    def global_objective(self, lw: LogWeights, bound: Tensor) -> Tuple[Tensor, Tensor]:
        """``G = mean_k [log p(theta_k) - log q(theta_k)]``, one global draw per particle;
        score-function global sites weighted by their particle's whole log-weight."""
        value = lw.global_log_ratio.mean()
        if lw.global_log_q_sf is None:
            return value, value
        particle = lw.scale * lw.log_w.sum(-1) + lw.global_log_ratio
        sf = (particle.detach() * lw.global_log_q_sf).mean() + lw.global_log_q_sf.mean()  # see reduce
        return value, value + (sf - sf.detach())


class ScoreFunctionELBO(ELBO):
    """ELBO whose guide gradients use only the score function, with variance-reducing
    baselines (NVIL, Mnih & Gregor 2014):

    ``grad = E_q[(log w - b(x) - c) * grad log q(z | x)] + E_q[grad log p(x, z)]``

    where ``c`` is a decaying average of earlier steps' learning signals (``decay``; none on
    the first step, which has no earlier ones) and ``b(x)`` an
    optional neural baseline (an MLP on the flattened datapoint) trained to minimise
    ``(log w - c - b(x))^2``. Both keep the gradient unbiased since they do not depend on z.
    """

    force_score_function = True
    supports_free_bits = False

    def __init__(
        self,
        num_particles: int = 1,
        decay: Optional[float] = 0.9,
        neural_baseline: bool = False,
        input_dim: Optional[int] = None,
        hidden: int = 100,
        **kwargs,
    ):
        super().__init__(num_particles, **kwargs)
        self.decay = decay
        self.average = None
        self.net = None
        if neural_baseline:
            if input_dim is None:
                raise ValueError("a neural baseline needs input_dim (the flattened data size)")
            self.net = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
        self._x = None
        self._train = False

    def loss_terms(self, model, guide, *args, train: bool = True, **kwargs):
        self._x = args[0] if args else kwargs.get("x")
        self._train = train
        if self.net is not None:
            pyro.module("sf_baseline", self.net)  # lets pyro.infer.SVI find its parameters
        try:
            return super().loss_terms(model, guide, *args, train=train, **kwargs)
        finally:
            self._x = None

    def _neural(self) -> Optional[Tensor]:
        if self.net is None:
            return None
        x = self._x.reshape(self._x.shape[0], -1).to(next(self.net.parameters()).dtype)
        return self.net(x).squeeze(-1)

    def learning_signal(self, lw: LogWeights, bound: Tensor) -> Tensor:
        signal = lw.log_w.detach()
        if self.decay is not None:
            mean = signal.mean()
            if self.average is not None:  # never the current batch's own mean: with B K = 1 that zeroes the signal
                signal = signal - self.average
            if self._train:
                old = mean if self.average is None else self.average
                self.average = self.decay * old + (1 - self.decay) * mean
        neural = self._neural()
        if neural is not None:
            signal = signal - neural.detach()
        return signal / lw.num_particles

    def aux_loss(self, lw: LogWeights, args: tuple, train: bool) -> Optional[Tensor]:
        neural = self._neural()
        if neural is None or not train:
            return None
        target = lw.log_w.detach() - (0.0 if self.average is None else self.average)
        return ((target - neural) ** 2).mean(0).sum()

    def modules(self) -> List[nn.Module]:
        return [self.net] if self.net is not None else []

    def state_dict(self) -> dict:
        state = {"average": self.average, **super().state_dict()}
        if self.net is not None:
            state["net"] = self.net.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.average = state.get("average")
        if self.net is not None and "net" in state:
            self.net.load_state_dict(state["net"])


class IWAE(LogWeightObjective):
    """Importance-weighted bound ``log (1/K) sum_k w_k`` per datapoint (Burda et al. 2016).

    ``E[IWAE_K] <= E[IWAE_2K] <= log p(x)``; ``IWAE_1`` is the ELBO. Non-reparameterized
    sites get the score-function term ``IWAE_K(x) * sum_k grad log q(z_k)`` (no baseline;
    VIMCO's leave-one-out baseline is the variance-reduced form).

    Global sites: one draw ``theta ~ q(theta)`` per step shared by the K particles; the
    minibatch objective ``log p(theta) / q(theta) + (N / B) sum_b IWAE_K(x_b | theta)`` has
    expectation ``<= ELBO_theta <= log p(X)`` (module docstring).
    """

    supports_globals = True
    global_draws = 1  # one global draw per step, shared by the K particles (module docstring)

    def per_datapoint(self, lw: LogWeights) -> Tensor:
        return torch.logsumexp(lw.log_w, dim=0) - math.log(lw.num_particles)

    def learning_signal(self, lw: LogWeights, bound: Tensor) -> Tensor:
        return bound.expand_as(lw.log_w)

    def global_objective(self, lw: LogWeights, bound: Tensor) -> Tuple[Tensor, Tensor]:
        """``G = log p(theta) - log q(theta)`` of the one shared global draw; a
        score-function global site is weighted by the step's whole bound."""
        value = lw.global_log_ratio.mean()  # the K entries are equal: one shared draw
        if lw.global_log_q_sf is None:
            return value, value
        log_q = lw.global_log_q_sf.mean()
        sf = (lw.scale * bound.sum() + value).detach() * log_q + log_q
        return value, value + (sf - sf.detach())


def _check_baseline(config: ObjectiveConfig) -> None:
    if config.baseline not in BASELINES:
        raise DGMError(f"unknown baseline {config.baseline!r}; choose from {', '.join(BASELINES)}")


BASELINES = ("none", "average", "neural")


@OBJECTIVES.register("elbo", "ELBO, reparameterized gradients (analytic KL with --analytic-kl)")
def _elbo(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> ELBO:
    return ELBO(config.k, analytic_kl=config.analytic_kl)


@OBJECTIVES.register("elbo-sf", "ELBO, score-function gradients for every guide site, with a baseline")
def _elbo_sf(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> ScoreFunctionELBO:
    _check_baseline(config)
    return ScoreFunctionELBO(
        config.k,
        decay=None if config.baseline == "none" else 0.9,
        neural_baseline=config.baseline == "neural",
        input_dim=None if data_spec is None else data_spec.dim,
    )


@OBJECTIVES.register("iwae", "importance-weighted bound with K samples per datapoint")
def _iwae(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> IWAE:
    return IWAE(config.k)
