"""The one interface every training objective implements, and their registry.

The runner trains through :class:`Objective` alone:

* ``check(model)`` refuses a model the objective cannot serve (one-line ``DGMError``);
* ``set_step(step)`` is called before every optimizer step (KL schedules use it);
* ``train_step(model, guide, x, idx, size, optimizer, conditions)`` takes one step and
  returns the step's detached terms (``loss`` and ``bound`` at least, per datapoint);
  the default differentiates ``loss_terms`` and steps the optimizer; a closed-form
  objective (EM) overrides it;
* ``validation_bound(model, guide, x, **conditions)`` is the per-datapoint bound ``[B]``
  the runner validates and early-stops on;
* ``modules()`` / ``state_dict()`` / ``load_state_dict()``: auxiliary trained parts
  (baselines) and state (schedules, running averages) for the optimizer and checkpoints.

What a runner needs to know about an objective it reads from declarations, never by
probing: ``full_batch`` (each step sees the whole training set, as EM does),
``uses_guide`` (False: the objective fits the model alone, so only the model's own guide
makes sense), ``supports_schedule`` and ``supports_free_bits``.

Gradient objectives also follow ``pyro.infer.ELBO``'s interface (``loss``,
``differentiable_loss``, ``loss_and_grads``), written here once on top of
``loss_terms``, so ``pyro.infer.SVI`` accepts them.

A new objective is one file: a subclass registered with
``@OBJECTIVES.register(name, description)`` on a factory ``(ObjectiveConfig, DataSpec) ->
Objective``.
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Tuple

import pyro
import torch
from torch import Tensor, nn

from inference.config import ConfigError, ObjectiveConfig
from models.base import DataSpec, DGMError, GenerativeModel, collect_aux_terms
from models.registry import Registry

Terms = Dict[str, Tensor]

OBJECTIVES = Registry("objective")
"""Objective name -> factory ``(config: ObjectiveConfig, data_spec: DataSpec) -> Objective``."""


class Objective:
    """Base class (a mixin beside ``pyro.infer.ELBO`` for gradient objectives)."""

    full_batch: ClassVar[bool] = False
    uses_guide: ClassVar[bool] = True
    supports_schedule: ClassVar[bool] = True
    supports_free_bits: ClassVar[bool] = False
    num_particles: int = 1
    config: Optional[ObjectiveConfig] = None  # what it was built from (make_objective records it)

    # --- what the runner calls ---------------------------------------------------------
    def check(self, model: GenerativeModel) -> None:
        """Refuse ``model`` with a one-line ``DGMError`` if this objective cannot train it."""

    def set_step(self, step: int) -> None:
        """Called once per optimizer step, before its loss (schedules). Default: nothing."""

    def train_step(
        self,
        model: GenerativeModel,
        guide,
        x: Tensor,
        idx: Tensor,
        size: int,
        optimizer: torch.optim.Optimizer,
        conditions: Dict[str, Tensor],
    ) -> Terms:
        """One optimizer step on the minibatch ``x`` (rows ``idx`` of ``size``)."""
        loss, terms = self.loss_terms(model.model, guide, x, idx, size, **conditions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        terms["loss"] = loss.detach() / size
        return terms

    def validation_bound(self, model: GenerativeModel, guide, x: Tensor, **conditions) -> Tensor:
        """The per-datapoint bound ``[B]`` on held-out ``x`` (no gradients)."""
        return self.bound(model.model, guide, x, **conditions)

    # --- the Pyro-level interface of gradient objectives -------------------------------
    def loss_terms(self, model, guide, *args, train: bool = True, **kwargs) -> Tuple[Tensor, Terms]:
        """Differentiable loss and detached per-term means (per datapoint, in nats)."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable loss")

    def bound(self, model, guide, *args, **kwargs) -> Tensor:
        """The per-datapoint bound ``[B]`` without gradients."""
        raise NotImplementedError(f"{type(self).__name__} has no per-datapoint bound")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        return self.loss_terms(model, guide, *args, **kwargs)[0]

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.loss_terms(model, guide, *args, train=False, **kwargs)[0].item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    # --- KL schedules ---------------------------------------------------------------------
    def set_schedule(self, schedule) -> "Objective":
        if schedule is not None:
            raise DGMError(f"KL annealing and free bits are not available with {type(self).__name__}; use elbo or iwae")
        return self

    # --- auxiliary state ------------------------------------------------------------------
    def modules(self) -> List[nn.Module]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def check_particles(num_particles) -> None:
    """Refuse a number of particles (samples per datapoint) below one."""
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ConfigError(
            f"the number of samples per datapoint (K, num_particles) must be an integer >= 1, got {num_particles!r}"
        )


def make_objective(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> Objective:
    """Build the objective ``config`` names, with its KL schedule if it asks for one."""
    from inference.schedules import make_schedule

    config.check()
    objective = OBJECTIVES.get(config.name).factory(config, data_spec)
    schedule = make_schedule(config.kl_warmup, config.kl_beta0, config.free_bits, config.free_bits_per)
    if schedule is not None and not objective.supports_schedule:
        raise ConfigError(f"KL annealing and free bits are not available with {config.name}; use elbo or iwae")
    objective = objective.set_schedule(schedule) if schedule is not None else objective
    objective.config = config  # a run directory records it
    return objective


def guess_plates(model, guide, args, kwargs) -> int:
    """Count the model's vectorized plates by running the pair once (as Pyro's ELBO does),
    without consuming the caller's random stream (nor adding auxiliary losses, nor updating
    model state)."""
    with pyro.poutine.block(), torch.random.fork_rng(devices=[]), collect_aux_terms(train=False):
        guide_trace = pyro.poutine.trace(guide).get_trace(*args, **kwargs) if guide else None
        fn = pyro.poutine.replay(model, trace=guide_trace) if guide_trace else model
        model_trace = pyro.poutine.trace(fn).get_trace(*args, **kwargs)
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        if trace is not None
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0
