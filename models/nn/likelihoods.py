"""Observation likelihoods: map a decoder's raw output to a distribution over x.

A model holds one ``Likelihood`` object instead of switching on a string in every method.
Each declares how many raw outputs it needs per data dimension (``params_per_dim``) and
builds a Pyro distribution whose event covers the whole datapoint.
"""

from __future__ import annotations

from typing import Optional

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import Tensor, nn

from models.base import DataSpec, DGMError


class Likelihood(nn.Module):
    """Base class. ``forward(raw)`` returns a distribution with ``event_shape == event``."""

    params_per_dim: int = 1

    def __init__(self, event_shape: tuple):
        super().__init__()
        self.event_shape = tuple(event_shape)

    def num_outputs(self) -> int:
        n = self.params_per_dim
        for s in self.event_shape:
            n *= s
        return n

    def forward(self, raw: Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, raw: Tensor) -> Tensor:
        return self(raw).mean


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels with logits ``raw``."""

    def forward(self, raw: Tensor) -> dist.TorchDistribution:
        logits = raw.reshape(raw.shape[:-1] + self.event_shape)
        return IndependentBernoulli(logits, len(self.event_shape))


class IndependentBernoulli(dist.TorchDistribution):
    """``Bernoulli(logits).to_event(event_dim)`` in one object. ``log_prob`` sums the
    per-pixel cross-entropies before negating, which saves a full pass (and allocation)
    over ``[K, B, pixels]`` in evaluation and in the backward pass."""

    arg_constraints = {}
    has_rsample = False

    def __init__(self, logits: Tensor, event_dim: int):
        self.logits = logits
        self._event_dim = event_dim
        cut = logits.dim() - event_dim
        super().__init__(logits.shape[:cut], logits.shape[cut:], validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.boolean, self._event_dim)

    def expand(self, batch_shape, _instance=None):
        return IndependentBernoulli(self.logits.expand(tuple(batch_shape) + tuple(self.event_shape)), self._event_dim)

    def log_prob(self, value: Tensor) -> Tensor:
        logits, value = torch.broadcast_tensors(self.logits, value)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -bce.sum(dim=tuple(range(-self._event_dim, 0)))

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.logits.expand(self._extended_shape(sample_shape))))

    @property
    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)


class Gaussian(Likelihood):
    """Independent Gaussians: ``raw`` holds means, and raw scales when ``per_datapoint``
    (heteroscedastic decoder); otherwise a learned scale, one shared by all dimensions or
    one per dimension (``per_dim``), or a fixed one (``learn_scale=False``)."""

    def __init__(
        self,
        event_shape: tuple,
        scale: Optional[float] = None,
        learn_scale: bool = True,
        per_datapoint: bool = False,
        min_scale: float = 1e-3,
        per_dim: bool = False,
    ):
        super().__init__(event_shape)
        self.per_datapoint = per_datapoint
        self.params_per_dim = 2 if per_datapoint else 1
        self.min_scale = min_scale
        init = torch.tensor(float(scale if scale is not None else 1.0)).log()
        if per_dim:
            init = init.expand(self.event_shape)
        if learn_scale and not per_datapoint:
            self.log_scale = nn.Parameter(init.clone())
        else:
            self.register_buffer("log_scale", init.clone())

    def forward(self, raw: Tensor) -> dist.TorchDistribution:
        shape = raw.shape[:-1] + self.event_shape
        if self.per_datapoint:
            loc, raw_scale = raw.chunk(2, dim=-1)
            scale = nn.functional.softplus(raw_scale.reshape(shape)) + self.min_scale
        else:
            loc = raw
            scale = self.log_scale.exp().clamp_min(self.min_scale).expand(shape)
        return dist.Normal(loc.reshape(shape), scale).to_event(len(self.event_shape))


class Categorical(Likelihood):
    """Independent categorical pixels with ``num_levels`` levels (values 0..K-1 as floats)."""

    def __init__(self, event_shape: tuple, num_levels: int):
        super().__init__(event_shape)
        self.params_per_dim = num_levels

    def forward(self, raw: Tensor) -> dist.TorchDistribution:
        logits = raw.reshape(raw.shape[:-1] + self.event_shape + (self.params_per_dim,))
        return _FloatCategorical(logits=logits, validate_args=False).to_event(len(self.event_shape))

    def mean(self, raw: Tensor) -> Tensor:
        probs = self(raw).base_dist.probs
        levels = torch.arange(self.params_per_dim, dtype=probs.dtype, device=probs.device)
        return (probs * levels).sum(-1)


class _FloatCategorical(dist.Categorical):
    """Categorical that accepts and returns level indices stored as floats (our data dtype)."""

    def log_prob(self, value: Tensor) -> Tensor:
        return super().log_prob(value.long())

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        return super().sample(sample_shape).to(self.logits.dtype)


GAUSSIAN_SCALES = ("shared", "per-pixel", "per-datapoint")


def likelihood_for(
    spec: DataSpec, gaussian_scale: Optional[float] = None, learn_scale: bool = True, scale_mode: str = "shared"
) -> Likelihood:
    """The natural likelihood for data of this spec. For real data, ``scale_mode`` says
    which decoder scale is learned: one ``shared`` by all pixels, one ``per-pixel``, or one
    ``per-datapoint`` (decoder outputs); ``learn_scale=False`` fixes it at ``gaussian_scale``."""
    if scale_mode not in GAUSSIAN_SCALES:
        raise DGMError(f"unknown decoder scale {scale_mode!r}; choose from {', '.join(GAUSSIAN_SCALES)}")
    if spec.support == "binary":
        return Bernoulli(spec.event_shape)
    if spec.support == "categorical":
        return Categorical(spec.event_shape, spec.num_levels)
    if spec.support == "real":
        if not learn_scale and scale_mode == "per-datapoint":
            raise DGMError("a fixed decoder scale cannot be per-datapoint; use learn_scale=True or scale_mode=shared")
        return Gaussian(
            spec.event_shape,
            scale=gaussian_scale,
            learn_scale=learn_scale,
            per_datapoint=scale_mode == "per-datapoint",
            per_dim=scale_mode == "per-pixel",
        )
    raise DGMError(f"no likelihood for support {spec.support!r}")
