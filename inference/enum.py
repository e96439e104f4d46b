"""The enumerated ELBO: discrete latent sites summed out exactly instead of sampled.

Sites marked ``infer={"enumerate": "parallel"}`` are enumerated, each over its own tensor
dimension, by Pyro's ``TraceEnum_ELBO`` machinery (Obermeyer et al. 2019):

* in the **guide**, an enumerated site ``y`` contributes ``sum_y q(y | x) [...]``: its
  expectation is exact, so e.g. the M2 semi-supervised VAE's unlabelled term
  ``sum_y q(y | x) (ELBO(x, y) - log q(y | x))`` has no sampling noise in ``y``;
* in the **model**, an enumerated site that the guide does not sample is marginalized,
  ``log p(x, z_rest) = log sum_y p(x, y, z_rest)`` (tensor variable elimination), so a
  mixture with an empty guide has ``ELBO = log p(x)`` exactly.

Other guide sites are sampled (one vectorized pass of ``num_particles`` particles);
non-reparameterizable ones get DiCE score-function terms (Foerster et al. 2018) without a
baseline.

Pyro's ``TraceEnum_ELBO`` returns only the minibatch total. The runner needs the bound
per datapoint (validation, diagnostics), so :class:`EnumELBO` evaluates the same DiCE
expectation (Pyro's ``Dice.compute_expectation``) but contracts every cost onto the
``"data"`` plate's dimension instead of summing it: the total is Pyro's loss (up to
rounding; tested) and each entry is one datapoint's bound. Minibatch scaling is that of
the data plate's ``subsample``: the loss is ``-(N / B) sum_b bound_b``. Costs that do not
depend on the data plate (sites outside it: global latents) are summed apart and counted
once per step, as ``TraceEnum_ELBO`` does: the loss is ``-[(N / B) sum_b bound_b + global]``.

References: F. Obermeyer, E. Bingham, M. Jankowiak, J. Chiu, N. Pradhan, A. Rush and
N. Goodman, "Tensor variable elimination for plated factor graphs", ICML 2019;
J. Foerster et al., "DiCE: the infinitely differentiable Monte Carlo estimator", ICML 2018.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import pyro.infer
import torch
from opt_einsum import shared_intermediates
from pyro.infer.traceenum_elbo import _compute_model_factors
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing, SampleRing
from torch import Tensor

from inference.config import ObjectiveConfig
from inference.logweights import data_frame
from inference.objective import OBJECTIVES, Objective, Terms, check_particles, guess_plates
from models.base import DATA_PLATE, DataSpec

__all__ = ["EnumELBO"]


def _empty_guide(*args, **kwargs) -> None:
    return None


class _PerDatapointDice(Dice):
    """Pyro's DiCE expectation with the final reduction kept per datapoint."""

    def expectation_per(self, costs: dict, symbol: str, size: int) -> Tuple[Tensor, Tensor]:
        """``sum`` of the expected costs over every dimension but ``symbol`` (the data
        plate's), ``[size]``, and the sum of the costs that do not depend on it (sites
        outside the data plate: global latents), a scalar. Follows
        ``Dice.compute_expectation`` line for line up to the last contraction."""
        total, global_total = 0.0, 0.0
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(x for x in log_factors if not isinstance(x, Tensor)))
                log_factors = [x for x in log_factors if isinstance(x, Tensor)]
                queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(log_factor._pyro_dims)
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    if queries[key] is None:
                        query = torch.zeros_like(cost)
                        query._pyro_dims = cost._pyro_dims
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
                for query in queries.values():
                    require_backward(query)
                root = ring.sumproduct(log_factors, sum_dims)
                root._pyro_backward()
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = queries[key]._pyro_backward_result.exp()
                    prob._pyro_dims = queries[key]._pyro_dims
                    cost, prob = packed.broadcast_all(cost, prob)
                    # 0 * log 0 = 0: a configuration of probability zero costs nothing
                    term = prob * torch.where(prob > 0, cost, torch.zeros_like(cost))
                    local = _onto(term, cost._pyro_dims, symbol, size)
                    if local is None:
                        global_total = global_total + scale * term.sum()
                    else:
                        total = total + scale * local
        return total, global_total


def _onto(term: Tensor, dims: str, symbol: str, size: int) -> Optional[Tensor]:
    """Sum ``term`` over every packed dimension except ``symbol``: ``[size]``; ``None`` for
    a term that does not depend on the data plate (a global site's)."""
    if symbol in dims:
        other = [i for i, d in enumerate(dims) if d != symbol]
        return term.sum(dim=other) if other else term  # (sum(dim=[]) would sum everything)
    if size == 1:  # packing drops dims of size 1: the lone datapoint takes it (each with its own scale)
        return term.sum().reshape(1)
    return None


def _per_datapoint_dice_elbo(model_trace, guide_trace) -> Tuple[Tensor, Tensor, float]:
    """``(elbo [B], global, scale)``: Pyro's ``_compute_dice_elbo`` kept per datapoint of the
    data plate (each entry carries the plate's subsample scale ``N / B``, also returned),
    and the terms of the sites outside it, counted once."""
    marginal_costs, log_factors, ordering, sum_dims, scale = _compute_model_factors(model_trace, guide_trace)
    if log_factors:
        dim_to_size = {}
        for terms in log_factors.values():
            for term in terms:
                dim_to_size.update(zip(term._pyro_dims, term.shape))
        with shared_intermediates() as cache:
            ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
            log_factors = contract_tensor_tree(log_factors, sum_dims, ring=ring)
        for t, log_factors_t in log_factors.items():
            marginal_costs.setdefault(t, []).extend(packed.scale_and_mask(term, scale=scale) for term in log_factors_t)
    costs = marginal_costs
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            costs.setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
    frame = data_frame(model_trace)
    symbol = model_trace.plate_to_symbol[DATA_PLATE]
    elbo, global_elbo = _PerDatapointDice(guide_trace, ordering).expectation_per(costs, symbol, frame.size)
    return elbo, global_elbo, (frame.full_size or frame.size) / frame.size


class EnumELBO(Objective, pyro.infer.TraceEnum_ELBO):
    """ELBO with exact sums over enumerated discrete sites, per datapoint.

    The same interface as the log-weight objectives (``inference.objectives``):
    ``loss_terms`` (loss and per-datapoint-mean diagnostics) for the runner, ``bound`` for
    evaluation, and ``pyro.infer.SVI`` compatibility through ``differentiable_loss``.
    ``max_plate_nesting`` is the model's (``model.max_plate_nesting``); by default it is
    guessed by tracing the pair once, without touching the caller's random stream.
    """

    supports_schedule = False

    def __init__(self, num_particles: int = 1, max_plate_nesting: Optional[int] = None):
        check_particles(num_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=float("inf") if max_plate_nesting is None else max_plate_nesting,
            vectorize_particles=True,
            strict_enumeration_warning=False,
        )

    def per_datapoint(self, model, guide, *args, **kwargs) -> Tuple[Tensor, float]:
        """``(bound [B], scale)``: the enumerated ELBO of each datapoint (averaged over
        particles) and the minibatch scale ``N / B``."""
        bound, _, scale = self.terms(model, guide, *args, **kwargs)
        return bound, scale

    def terms(self, model, guide, *args, **kwargs) -> Tuple[Tensor, Tensor, float]:
        """``(bound [B], global, scale)``: :meth:`per_datapoint` and the term of the sites
        outside the data plate (global latents), counted once per step as in Pyro's
        ``TraceEnum_ELBO``; 0 without any."""
        guide = guide if guide is not None else _empty_guide
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plates(model, guide, args, kwargs) + (self.num_particles > 1)
        values, globals_, scale = [], [], 1.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo, global_elbo, scale = _per_datapoint_dice_elbo(model_trace, guide_trace)
            values.append(elbo)
            globals_.append(global_elbo)
        total = values[0] if len(values) == 1 else torch.stack(values).sum(0)
        return total / (scale * self.num_particles), sum(globals_) / self.num_particles, scale

    def loss_terms(self, model, guide, *args, train: bool = True, **kwargs) -> Tuple[Tensor, Terms]:
        """Differentiable loss ``-[(N / B) sum_b bound_b + global]`` and the detached mean
        bound (plus ``global / N``, the global term's share per datapoint)."""
        bound, global_elbo, scale = self.terms(model, guide, *args, **kwargs)
        mean = bound.detach().mean()
        if isinstance(global_elbo, Tensor):
            mean = mean + global_elbo.detach() / (scale * bound.shape[-1])
        return -(scale * bound.sum() + global_elbo), {"bound": mean}

    def bound(self, model, guide, *args, **kwargs) -> Tensor:
        """The per-datapoint bound ``[B]`` without gradients (for evaluation)."""
        with torch.no_grad():
            return self.per_datapoint(model, guide, *args, **kwargs)[0]


@OBJECTIVES.register("elbo-enum", "ELBO with discrete sites marked for enumeration summed out exactly")
def _elbo_enum(config: ObjectiveConfig, data_spec: Optional[DataSpec] = None) -> EnumELBO:
    return EnumELBO(config.k)
